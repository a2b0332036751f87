"""The FP16 float-parts pass for INT8 TensorRT engines, checked with onnx.checker and ONNX Runtime on the CPU.

ONNX Runtime's CPU provider runs the converted graph with float16 tensors
between nodes (where it has no FP16 kernel it casts around the node, so
weights and every activation are still rounded to FP16), against the FP32
QDQ file it came from: on a MONAI UNet and on the shipped deepbet network
with real MRI patches. The numbers in the bounds were measured here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.fp16_float_parts import KEEP_FLOAT32_OPS, convert_float_parts
from SlicerPTQLib.onnx_graph import cpu_session
from tensorrt_models import export_unet

ROI = (32, 32, 32)


def _blobs(batch: int, roi) -> np.ndarray:
    """Smooth blobs in [0, 1], a segmentation-like input (argmax on noise would mean nothing)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size) for size in roi], indexing="ij"))
    images = []
    for index in range(batch):
        centre = np.array([0.3, -0.2, 0.1]) * (1 - 2 * (index % 2))
        distance = np.sqrt(((grid - centre.reshape(3, 1, 1, 1)) ** 2).sum(axis=0))
        images.append(1 / (1 + np.exp((distance - 0.45 - 0.1 * index) * 12)))
    return np.asarray(images, dtype=np.float32)[:, None]


def _run(path: Path, batch: np.ndarray) -> np.ndarray:
    session = cpu_session(str(path))
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """``(fp32, qdq, converted, conversion)`` of a MONAI UNet quantized with SlicerPTQ's TensorRT placement."""
    from SlicerPTQLib.calibration import sample_crops
    from SlicerPTQLib.qdq import quantize_onnx

    folder = tmp_path_factory.mktemp("float_parts")
    fp32 = export_unet(folder / "unet.fp32.onnx", ROI)
    qdq = folder / "unet.int8.onnx"
    quantize_onnx(fp32, qdq, sample_crops([_blobs(1, (64, 64, 64))[0]], ROI, 4, seed=0), placement="tensorrt")
    conversion = convert_float_parts(qdq, folder / "unet.int8.fp16.onnx")
    return fp32, qdq, folder / "unet.int8.fp16.onnx", conversion


def _types(model) -> dict:
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {init.name: init.data_type for init in model.graph.initializer}
    for value in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    return types


def test_float_parts_are_fp16_around_int8_and_the_rest_stays_fp32(unet):
    _, qdq, converted, conversion = unet
    model = onnx.load(str(converted))
    onnx.checker.check_model(model, full_check=True)
    types = _types(model)
    assert max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")) == 19
    assert [types[v.name] for v in model.graph.input] == [TensorProto.FLOAT]
    assert [types[v.name] for v in model.graph.output] == [TensorProto.FLOAT]
    producers = {out: node for node in model.graph.node for out in node.output}
    # Every Q/DQ scale is FP16; the convolutions read FP16 straight from their DequantizeLinear.
    qdq_nodes = [node for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq_nodes and {types[node.input[1]] for node in qdq_nodes} == {TensorProto.FLOAT16}
    convs = [node for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose")]
    for node in convs:
        assert producers[node.input[1]].op_type == "DequantizeLinear", node.name
        assert {types[name] for name in node.input if name} - {TensorProto.FLOAT16} == set(), node.name
        assert types[node.output[0]] == TensorProto.FLOAT16
    # Norms run FP32 between Casts; the input is cast once, the output cast back once.
    norms = [node for node in model.graph.node if node.op_type == "InstanceNormalization"]
    assert norms and all(types[node.output[0]] == TensorProto.FLOAT for node in norms)
    assert all(producers[node.input[0]].op_type == "Cast" for node in norms)
    assert producers[model.graph.output[0].name].op_type == "Cast"
    casts_from_input = [node for node in model.graph.node if node.input and node.input[0] == "input"]
    assert [node.op_type for node in casts_from_input] == ["Cast"]
    assert conversion.fp16_nodes > 3 * conversion.fp32_nodes
    assert set(conversion.kept_float32.values()) == {"InstanceNormalization is kept in FP32"}
    assert conversion.casts_added == Counter(node.op_type for node in model.graph.node)["Cast"]
    # The int8 weights themselves are untouched.
    before = {init.name: numpy_helper.to_array(init) for init in onnx.load(str(qdq)).graph.initializer
              if init.data_type == TensorProto.INT8}
    after = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    assert before and all(np.array_equal(after[name], value) for name, value in before.items())


def test_unet_in_onnxruntime_tracks_the_fp32_qdq_model(unet):
    fp32, qdq, converted, _ = unet
    batch = _blobs(2, ROI)
    reference, int8, half = _run(fp32, batch), _run(qdq, batch), _run(converted, batch)
    assert half.dtype == np.float32 and half.shape == int8.shape
    # FP16 rounding moves activations across INT8 rounding boundaries, so the two INT8 models differ
    # (measured: 0.045 mean abs), but the FP16 one is as close to FP32 as the FP32-float one (measured:
    # 0.0635 vs 0.0638 mean abs, logits up to 10.6; argmax agreement 0.953 vs 0.951 on this untrained UNet).
    assert float(np.abs(half - int8).mean()) > 0
    fp16_error = float(np.abs(half - reference).mean())
    int8_error = float(np.abs(int8 - reference).mean())
    assert fp16_error < 1.1 * int8_error, (fp16_error, int8_error)
    agreement = {name: float((out.argmax(1) == reference.argmax(1)).mean()) for name, out in
                 (("int8", int8), ("int8_fp16", half))}
    assert agreement["int8_fp16"] >= agreement["int8"] - 0.01, agreement


def test_deepbet_on_real_patches(shipped_model_path, calibration_paths, evaluation_cases, tmp_path):
    """The shipped brain-extraction network (InstanceNorm, ConvTranspose, Softmax) on real MRI patches."""
    from SlicerPTQLib.metrics import mean_dice
    from SlicerPTQLib.pipeline import quantize, read_any
    from SlicerPTQLib.preprocess import prepare

    result = quantize(shipped_model_path, calibration_paths[:2], out_dir=tmp_path / "q", num_crops=4,
                      placement="tensorrt")
    conversion = convert_float_parts(result.quantized_onnx, tmp_path / "model.int8.fp16.onnx")
    assert set(conversion.kept_float32.values()) == {"InstanceNormalization is kept in FP32",
                                                     "Softmax is kept in FP32"}
    image, _ = prepare(read_any(evaluation_cases[0][1]), result.spec)
    roi = tuple(result.spec.roi_size)
    image = np.pad(image, [(0, 0)] + [(0, max(0, r - s)) for s, r in zip(image.shape[1:], roi)])
    starts = [(s - r) // 2 for s, r in zip(image.shape[1:], roi)]
    centre = image[:, starts[0]:starts[0] + roi[0], starts[1]:starts[1] + roi[1], starts[2]:starts[2] + roi[2]]
    patches = np.ascontiguousarray(np.stack([centre, np.flip(centre, 1), np.flip(centre, 3)]), dtype=np.float32)
    outputs = {name: np.concatenate([_run(path, patches[i:i + 1]) for i in range(len(patches))])
               for name, path in (("fp32", result.fp32_onnx), ("int8", result.quantized_onnx),
                                  ("int8_fp16", tmp_path / "model.int8.fp16.onnx"))}
    labels = {name: out.argmax(1) for name, out in outputs.items()}
    assert labels["fp32"].any()
    # Measured here (3 patches of 128^3): labels of the FP16-float-parts and the FP32-float INT8 models agree
    # on 99.91% of voxels (foreground Dice 0.9983, softmax mean abs diff 0.00095); vs FP32 they agree on
    # 99.900% and 99.903%, foreground Dice 0.9981 and 0.9982.
    assert (labels["int8_fp16"] == labels["int8"]).mean() >= 0.998
    agreement = {name: float((labels[name] == labels["fp32"]).mean()) for name in ("int8", "int8_fp16")}
    assert agreement["int8_fp16"] >= agreement["int8"] - 0.0005, agreement
    assert mean_dice(labels["int8_fp16"], labels["int8"]) >= 0.995
    assert mean_dice(labels["int8_fp16"], labels["fp32"]) >= mean_dice(labels["int8"], labels["fp32"]) - 0.001
    assert float(np.abs(outputs["int8_fp16"] - outputs["int8"]).mean()) < 0.003


def _with_weight_dq_scale(qdq: Path, out: Path, value: float):
    """``qdq`` with channel 0 of the first Conv's weight scale set to ``value``; returns (conv name, scale name)."""
    model = onnx.load(str(qdq))
    producers = {o: node for node in model.graph.node for o in node.output}
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    scale_name = producers[conv.input[1]].input[1]
    scale = next(init for init in model.graph.initializer if init.name == scale_name)
    array = numpy_helper.to_array(scale).copy()
    array.flat[0] = value
    scale.CopyFrom(numpy_helper.from_array(array, scale_name))
    onnx.save(model, str(out))
    return conv.name, scale_name


def _initializer(model, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(init for init in model.graph.initializer if init.name == name))


def test_a_scale_below_fp16_normals_is_raised_and_its_weights_requantized(unet, tmp_path):
    _, qdq, _, _ = unet
    conv_name, scale_name = _with_weight_dq_scale(qdq, tmp_path / "tiny.onnx", 1e-6)
    conversion = convert_float_parts(tmp_path / "tiny.onnx", tmp_path / "tiny.fp16.onnx")
    assert conversion.raised_scales == {scale_name: 1} and conv_name not in conversion.kept_float32
    before, after = onnx.load(str(tmp_path / "tiny.onnx")), onnx.load(str(tmp_path / "tiny.fp16.onnx"))
    producers = {o: node for node in after.graph.node for o in node.output}
    dequantize = producers[next(node for node in after.graph.node if node.name == conv_name).input[1]]
    assert dequantize.op_type == "DequantizeLinear" and _types(after)[scale_name] == TensorProto.FLOAT16
    new_scale = _initializer(after, scale_name)
    assert new_scale.flat[0] == np.float16(np.finfo(np.float16).tiny)
    old_scale = _initializer(before, scale_name)
    np.testing.assert_allclose(new_scale[1:], old_scale[1:], rtol=1e-3)
    # Channel 0 dequantizes to the same values up to half the new step; the other channels are untouched.
    old_weights, new_weights = _initializer(before, dequantize.input[0]), _initializer(after, dequantize.input[0])
    np.testing.assert_array_equal(new_weights[1:], old_weights[1:])
    error = np.abs(new_weights[0] * float(new_scale.flat[0]) - old_weights[0] * 1e-6)
    assert error.max() <= float(new_scale.flat[0]) / 2 + 1e-12
    assert _run(tmp_path / "tiny.fp16.onnx", _blobs(1, ROI)).shape == (1, 2, *ROI)


def test_a_scale_beyond_fp16_range_keeps_its_dequantize_fp32(unet, tmp_path):
    _, qdq, _, _ = unet
    _, scale_name = _with_weight_dq_scale(qdq, tmp_path / "huge.onnx", 1e6)
    conversion = convert_float_parts(tmp_path / "huge.onnx", tmp_path / "huge.fp16.onnx")
    assert "its scale exceeds FP16's range" in conversion.kept_float32.values()
    model = onnx.load(str(tmp_path / "huge.fp16.onnx"))
    types = _types(model)
    producers = {o: node for node in model.graph.node for o in node.output}
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    # The weight reaches the FP16 Conv through a Cast from the FP32 DequantizeLinear, which keeps its scale.
    cast = producers[conv.input[1]]
    assert cast.op_type == "Cast" and producers[cast.input[0]].op_type == "DequantizeLinear"
    assert types[scale_name] == TensorProto.FLOAT and types[conv.input[1]] == TensorProto.FLOAT16


def test_a_weight_beyond_fp16_range_keeps_its_node_fp32(unet, tmp_path):
    _, qdq, _, _ = unet
    model = onnx.load(str(qdq))
    conv = next(node for node in model.graph.node if node.op_type == "Conv" and len(node.input) > 2)
    bias = next(init for init in model.graph.initializer if init.name == conv.input[2])
    array = numpy_helper.to_array(bias).copy()
    array.flat[0] = 1e5
    bias.CopyFrom(numpy_helper.from_array(array, bias.name))
    onnx.save(model, str(tmp_path / "big.onnx"))
    conversion = convert_float_parts(tmp_path / "big.onnx", tmp_path / "big.fp16.onnx")
    assert conversion.kept_float32[conv.name] == "a weight exceeds FP16's range"
    converted = onnx.load(str(tmp_path / "big.fp16.onnx"))
    kept = next(node for node in converted.graph.node if node.name == conv.name)
    assert _types(converted)[kept.output[0]] == TensorProto.FLOAT
    bias_after = next(init for init in converted.graph.initializer if init.name == conv.input[2])
    assert numpy_helper.to_array(bias_after).flat[0] == np.float32(1e5)


def test_keep_list_covers_norms_reductions_and_softmax():
    for op in ("InstanceNormalization", "GroupNormalization", "ReduceMean", "Softmax", "Exp"):
        assert op in KEEP_FLOAT32_OPS


def test_bad_inputs_are_one_ptqerror(unet, tmp_path):
    fp32, _, _, _ = unet
    with pytest.raises(PTQError, match="no Q/DQ nodes"):
        convert_float_parts(fp32, tmp_path / "x.onnx")
    with pytest.raises(PTQError, match="does not exist"):
        convert_float_parts(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(PTQError, match="Cannot read ONNX model"):
        convert_float_parts(tmp_path / "junk.onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
