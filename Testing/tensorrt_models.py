"""Small real ONNX networks for the TensorRT tests: a MONAI 3D UNet and its onnxruntime QDQ form."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def export_unet(path: Path, roi: Sequence[int], channels: Sequence[int] = (8, 16, 32), num_res_units: int = 1,
                dynamic_spatial: bool = True, batch_dynamic: bool = True) -> Path:
    """A seeded MONAI UNet (1 -> 2 channels, ConvTranspose upsampling) exported to ONNX opset 17."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=tuple(channels),
               strides=(2,) * (len(channels) - 1), num_res_units=num_res_units).eval()
    axes = ({0: "batch"} if batch_dynamic else {}) | ({2: "d", 3: "h", 4: "w"} if dynamic_spatial else {})
    torch.onnx.export(net, torch.randn(1, 1, *roi), str(path), opset_version=17, dynamo=False,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": axes, "output": axes} if axes else None)
    return path


def ort_qdq(float_onnx: Path, out: Path, roi: Sequence[int], crops: int) -> Path:
    """``float_onnx`` quantized by onnxruntime (symmetric INT8 QDQ, per-channel weights, float biases)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Crops(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.items = iter([{"input": rng.standard_normal((1, 1, *roi)).astype(np.float32)}
                               for _ in range(crops)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(float_onnx), str(out), Crops(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    return out
