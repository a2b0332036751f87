"""The Q/DQ rule checker on real QDQ graphs (CPU only).

The reference QDQ file comes from an independent producer: a small MONAI
UNet (3D convs, ConvTranspose, InstanceNorm, residual adds) exported by
torch and quantized by onnxruntime's ``quantize_static`` (symmetric int8,
per-channel weights). Each broken variant changes one thing in that graph
with ``onnx.helper``/``numpy_helper``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.qdq_check import ERROR, WARNING, assert_valid, check_qdq

PATCH = (1, 1, 16, 16, 16)


def _export_unet(path):
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
               num_res_units=1).eval()
    torch.onnx.export(net, torch.randn(PATCH), str(path), opset_version=17, dynamo=False,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def _quantize(fp32_path, out_path, **extra):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Crops(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            # Smooth blobs (a low-pass of noise), closer to image content than white noise.
            crops = [np.cumsum(np.cumsum(rng.standard_normal(PATCH), axis=3), axis=4) / 8 for _ in range(4)]
            self.items = iter([{"input": crop.astype(np.float32)} for crop in crops])

        def get_next(self):
            return next(self.items, None)

    options = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    options.update(extra)
    quantize_static(str(fp32_path), str(out_path), Crops(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, extra_options=options)
    return out_path


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qdq")
    fp32 = _export_unet(folder / "unet.fp32.onnx")
    return {"fp32": fp32, "qdq": _quantize(fp32, folder / "unet.int8.onnx")}


@pytest.fixture()
def qdq_model(model_files):
    return onnx.load(str(model_files["qdq"]))


def _errors(findings):
    return [f for f in findings if f.severity == ERROR]


def _node(model, predicate):
    return next(node for node in model.graph.node if predicate(node))


def _initializer(model, name):
    return next(init for init in model.graph.initializer if init.name == name)


def _set_initializer(model, name, array):
    _initializer(model, name).CopyFrom(numpy_helper.from_array(np.asarray(array), name))


def _weight_dq(model, consumer_op, square=False):
    """The weight DequantizeLinear of a ``consumer_op`` node (optionally with C_out == C_in)."""
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != consumer_op:
            continue
        dq = _node(model, lambda n: n.output and n.output[0] == node.input[1])
        shape = list(inits[dq.input[0]].dims)
        if not square or shape[0] == shape[1]:
            return dq, shape
    raise AssertionError(f"no {consumer_op} weight to break")


def _activation_pair(model):
    """The Q/DQ pair on the network input."""
    quantize = _node(model, lambda n: n.op_type == "QuantizeLinear" and n.input[0] == "input")
    dequantize = _node(model, lambda n: n.op_type == "DequantizeLinear" and n.input[0] == quantize.output[0])
    return quantize, dequantize


def test_reference_file_passes(model_files):
    trt_findings = check_qdq(model_files["qdq"], "tensorrt")
    assert _errors(trt_findings) == []
    # The only TensorRT remark on onnxruntime's file: its ConvTranspose weights are per output channel.
    assert trt_findings and all("ConvTranspose" in f.message and "axis 1" in f.message for f in trt_findings)
    assert check_qdq(model_files["qdq"], "openvino") == []
    assert assert_valid(model_files["qdq"], "tensorrt") == trt_findings


def test_float_model_is_not_a_qdq_model(model_files):
    findings = check_qdq(model_files["fp32"])
    assert [f.severity for f in findings] == [ERROR]
    assert "not a QDQ model" in findings[0].message


def test_asymmetric_zero_point_is_an_error_for_tensorrt(qdq_model):
    quantize, _ = _activation_pair(qdq_model)
    _set_initializer(qdq_model, quantize.input[2], np.int8(5))
    errors = _errors(check_qdq(qdq_model, "tensorrt"))
    assert any("asymmetric" in f.message and f.node == quantize.name for f in errors)
    openvino = check_qdq(qdq_model, "openvino")
    assert not _errors(openvino) and any("asymmetric" in f.message for f in openvino)


def test_missing_dequantize_after_quantize(qdq_model):
    quantize, dequantize = _activation_pair(qdq_model)
    for node in qdq_model.graph.node:
        for index, name in enumerate(node.input):
            if name == dequantize.output[0]:
                node.input[index] = quantize.output[0]
    qdq_model.graph.node.remove(dequantize)
    errors = _errors(check_qdq(qdq_model))
    assert any(f.node == quantize.name and "followed by a DQ" in f.message for f in errors)


def test_wrong_per_channel_axis_on_conv_weights(qdq_model):
    dequantize, shape = _weight_dq(qdq_model, "Conv", square=True)
    dequantize.attribute.remove(next(a for a in dequantize.attribute if a.name == "axis"))
    dequantize.attribute.append(helper.make_attribute("axis", 1))
    errors = _errors(check_qdq(qdq_model))
    assert any(f.node == dequantize.name and "output-channel axis 0" in f.message for f in errors), shape


def test_wrong_scale_length(qdq_model):
    dequantize, shape = _weight_dq(qdq_model, "Conv")
    scale = numpy_helper.to_array(_initializer(qdq_model, dequantize.input[1]))
    _set_initializer(qdq_model, dequantize.input[1], scale[:-1])
    _set_initializer(qdq_model, dequantize.input[2], np.zeros(scale.size - 1, np.int8))
    errors = _errors(check_qdq(qdq_model))
    assert any(f.node == dequantize.name and f"one scale per channel ({shape[0]})" in f.message for f in errors)


@pytest.mark.parametrize("bad_value, words", [(-0.02, "positive"), (0.0, "positive"), (np.nan, "NaN")])
def test_bad_activation_scale(qdq_model, bad_value, words):
    quantize, dequantize = _activation_pair(qdq_model)
    _set_initializer(qdq_model, quantize.input[1], np.float32(bad_value))
    errors = _errors(check_qdq(qdq_model, "openvino"))
    assert any(words in f.message for f in errors)
    assert {f.node for f in errors} >= {quantize.name}


def test_per_channel_activation_scale(qdq_model):
    quantize, dequantize = _activation_pair(qdq_model)
    scale = float(numpy_helper.to_array(_initializer(qdq_model, quantize.input[1])))
    for node in (quantize, dequantize):
        node.attribute.append(helper.make_attribute("axis", 1))
    _set_initializer(qdq_model, quantize.input[1], np.full(1, scale, np.float32).repeat(2))
    _set_initializer(qdq_model, quantize.input[2], np.zeros(2, np.int8))
    errors = _errors(check_qdq(qdq_model))
    assert any("per tensor" in f.message and f.node == quantize.name for f in errors)


def test_uint8_activations_are_an_error_for_tensorrt(qdq_model):
    quantize, _ = _activation_pair(qdq_model)
    _set_initializer(qdq_model, quantize.input[2], np.uint8(0))
    errors = _errors(check_qdq(qdq_model, "tensorrt"))
    assert any("uint8" in f.message and f.node == quantize.name for f in errors)
    assert not _errors(check_qdq(qdq_model, "openvino"))


def test_int32_bias_dequantize_is_an_error_for_tensorrt(model_files, tmp_path):
    with_bias = _quantize(model_files["fp32"], tmp_path / "bias.int8.onnx", QuantizeBias=True)
    errors = _errors(check_qdq(with_bias, "tensorrt"))
    assert errors and all("int32" in f.message for f in errors)
    assert not _errors(check_qdq(with_bias, "openvino"))


def test_convtranspose_without_output_quantize_warns(qdq_model):
    convtranspose = _node(qdq_model, lambda n: n.op_type == "ConvTranspose")
    quantize = _node(qdq_model, lambda n: n.op_type == "QuantizeLinear" and n.input[0] == convtranspose.output[0])
    dequantize = _node(qdq_model, lambda n: n.op_type == "DequantizeLinear" and n.input[0] == quantize.output[0])
    for node in qdq_model.graph.node:
        for index, name in enumerate(node.input):
            if name == dequantize.output[0]:
                node.input[index] = convtranspose.output[0]
    qdq_model.graph.node.remove(quantize)
    qdq_model.graph.node.remove(dequantize)
    findings = check_qdq(qdq_model, "tensorrt")
    assert not _errors(findings)
    assert any(f.node == convtranspose.name and f.severity == WARNING and "#2597" in f.message for f in findings)


def test_convtranspose_axis_is_target_specific(qdq_model):
    dequantize, shape = _weight_dq(qdq_model, "ConvTranspose")
    assert numpy_helper.to_array(_initializer(qdq_model, dequantize.input[1])).size == shape[1]
    # Requantize the same weights per input channel (axis 0), as NVIDIA's tools do.
    weights = numpy_helper.to_array(_initializer(qdq_model, dequantize.input[0])).astype(np.float32)
    scales = numpy_helper.to_array(_initializer(qdq_model, dequantize.input[1]))
    real = weights * scales.reshape(1, -1, 1, 1, 1)
    per_input = np.abs(real).reshape(shape[0], -1).max(axis=1) / 127
    _set_initializer(qdq_model, dequantize.input[0],
                     np.clip(np.round(real / per_input.reshape(-1, 1, 1, 1, 1)), -127, 127).astype(np.int8))
    _set_initializer(qdq_model, dequantize.input[1], per_input.astype(np.float32))
    _set_initializer(qdq_model, dequantize.input[2], np.zeros(shape[0], np.int8))
    axis = next(a for a in dequantize.attribute if a.name == "axis")
    axis.i = 0
    tensorrt_notes = [f for f in check_qdq(qdq_model, "tensorrt") if f.node == dequantize.name]
    openvino_notes = [f for f in check_qdq(qdq_model, "openvino") if f.node == dequantize.name]
    assert tensorrt_notes == []
    assert [f.severity for f in openvino_notes] == [WARNING]


def test_assert_valid_lists_every_error(qdq_model):
    quantize, _ = _activation_pair(qdq_model)
    _set_initializer(qdq_model, quantize.input[2], np.int8(3))
    _set_initializer(qdq_model, quantize.input[1], np.float32(-1.0))
    with pytest.raises(PTQError) as raised:
        assert_valid(qdq_model, "tensorrt")
    message = str(raised.value)
    # The Q and its DQ share both initializers, so each breaks both rules.
    assert "4 Q/DQ rule(s)" in message and message.count("asymmetric") == 2 and message.count("positive") == 2


def test_unknown_target_and_unreadable_file(tmp_path, model_files):
    with pytest.raises(PTQError, match="Unknown Q/DQ check target"):
        check_qdq(model_files["qdq"], "coreml")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not a protobuf" * 10)
    with pytest.raises(PTQError, match="Cannot read ONNX model"):
        check_qdq(junk)


def test_project_quantizer_output_passes_tensorrt_rules(model_files, tmp_path):
    try:
        from SlicerPTQLib.qdq import quantize_onnx
    except ImportError as exc:
        pytest.skip(f"SlicerPTQLib.qdq is not importable yet: {exc}")
    rng = np.random.default_rng(1)
    crops = [np.cumsum(rng.standard_normal(PATCH[1:]), axis=3).astype(np.float32) / 4 for _ in range(3)]
    out = tmp_path / "unet.project.int8.onnx"
    quantize_onnx(model_files["fp32"], out, crops, method="max", placement="tensorrt")
    findings = check_qdq(out, "tensorrt")
    assert _errors(findings) == [], [str(f) for f in findings]
