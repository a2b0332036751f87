"""FP32 ONNX export of TorchScript and MONAI networks, and ONNX input checks."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.export import export_onnx, onnx_input_spec


class ConvBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.norm = torch.nn.InstanceNorm3d(4)
        self.up = torch.nn.ConvTranspose3d(4, 2, 2, stride=2)

    def forward(self, x):
        return torch.softmax(self.up(torch.relu(self.norm(self.conv(x)))), dim=1)


class BakesItsShape(torch.nn.Module):
    """Reads the input shape as Python ints, which tracing freezes into the graph."""

    def forward(self, x):
        return x + torch.zeros(int(x.shape[2]), int(x.shape[3]), int(x.shape[4]))


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def assert_matches_torch(module, path, shapes):
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = module(x).numpy()
        assert np.abs(run_onnx(path, x) - expected).max() < 1e-4


def test_torchscript_exports_with_dynamic_dims(tmp_path):
    scripted = torch.jit.script(ConvBlock().eval())
    path = export_onnx(scripted, tmp_path / "script.onnx", in_channels=1,
                       example_shape=(1, 1, 16, 16, 16))
    assert [p.name for p in tmp_path.iterdir()] == ["script.onnx"], "temporary files left behind"
    spec = onnx_input_spec(path, expected_channels=1)
    assert spec.name == "input" and spec.channels == 1
    assert spec.dynamic_spatial and spec.static_spatial is None
    assert_matches_torch(scripted, path, [(1, 1, 16, 16, 16), (2, 1, 24, 8, 32)])


def test_monai_unet_exports_with_dynamic_dims(tmp_path):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    unet = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()
    path = export_onnx(unet, tmp_path / "unet.onnx", in_channels=1, example_shape=(1, 1, 32, 32, 32))
    assert_matches_torch(unet, path, [(1, 1, 32, 32, 32), (1, 1, 48, 16, 64)])


def test_static_export_keeps_the_example_size(tmp_path):
    path = export_onnx(ConvBlock(), tmp_path / "static.onnx", 1, (1, 1, 16, 24, 8),
                       dynamic_spatial=False)
    assert onnx_input_spec(path).static_spatial == (16, 24, 8)


def test_shape_baking_network_is_caught(tmp_path):
    target = tmp_path / "baked.onnx"
    with pytest.raises(PTQError, match="dynamic_spatial=False"):
        export_onnx(BakesItsShape(), target, 1, (1, 1, 8, 8, 8))
    assert list(tmp_path.iterdir()) == [], "a failed export left files behind"
    export_onnx(BakesItsShape(), target, 1, (1, 1, 8, 8, 8), dynamic_spatial=False)


def test_channel_mismatch_names_file_and_counts(tmp_path):
    path = export_onnx(ConvBlock(), tmp_path / "one_channel.onnx", 1, (1, 1, 8, 8, 8))
    with pytest.raises(PTQError) as error:
        onnx_input_spec(path, expected_channels=4)
    message = str(error.value)
    assert "one_channel.onnx" in message and "1 input channel" in message and "says 4" in message


def test_wrong_example_shape_and_unreadable_file(tmp_path):
    with pytest.raises(PTQError, match="must be"):
        export_onnx(ConvBlock(), tmp_path / "x.onnx", 2, (1, 1, 8, 8, 8))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(PTQError, match="broken.onnx"):
        onnx_input_spec(broken)
