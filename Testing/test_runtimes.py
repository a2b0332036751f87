"""Runtimes: the backends agree in FP32, OpenVINO really runs what it says."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from SlicerPTQLib.cpu_info import cpu_info, describe, parse_cpuinfo  # noqa: E402
from SlicerPTQLib.errors import PTQError  # noqa: E402
from SlicerPTQLib.int8_compat import as_run_here, path_here  # noqa: E402
from SlicerPTQLib.runtimes import available_backends, create_runtime, int8_summary  # noqa: E402
from SlicerPTQLib.runtimes.torch_runtime import TorchRuntime  # noqa: E402

PATCH = (1, 1, 32, 32, 32)


@pytest.fixture(scope="module")
def unet_files(tmp_path_factory):
    """A small random MONAI UNet as TorchScript, FP32 ONNX (dynamic spatial dims) and QDQ ONNX."""
    from monai.networks.nets import UNet
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    folder = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16, 32),
               strides=(2, 2), num_res_units=1).eval()
    example = torch.rand(PATCH)
    torchscript = folder / "unet.pt"
    torch.jit.trace(net, example).save(str(torchscript))
    fp32 = folder / "unet.onnx"
    dynamic = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    torch.onnx.export(net, example, str(fp32), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": dynamic, "logits": dynamic})

    class RandomPatches(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.batches = iter([{"image": rng.random(PATCH, dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    qdq = folder / "unet.qdq.onnx"
    quantize_static(str(fp32), str(qdq), RandomPatches(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return {"net": net, "torchscript": torchscript, "fp32": fp32, "qdq": qdq}


@pytest.fixture(scope="module")
def qdq_conv_file(tmp_path_factory):
    """One Conv3d in Q/DQ form built by hand: int8 per-channel weights, int8 symmetric input."""
    rng = np.random.default_rng(2)
    weight_int8 = rng.integers(-127, 128, size=(8, 4, 3, 3, 3)).astype(np.int8)
    weight_scale = rng.uniform(0.001, 0.01, size=8).astype(np.float32)
    initializers = [
        numpy_helper.from_array(weight_int8, "w_int8"),
        numpy_helper.from_array(weight_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(1.0 / 127, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zero"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["y"], pads=[1] * 6),
    ]
    graph = helper.make_graph(
        nodes, "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16, 16])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # onnx 1.23 writes IR 14 by default, newer than ONNX Runtime 1.31 reads
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("qdq_conv") / "conv.qdq.onnx"
    onnx.save(model, str(path))
    return path


def test_cpu_backends_are_available():
    reasons = available_backends()
    assert set(reasons) == {"torch", "onnxruntime", "openvino", "tensorrt"}
    for backend in ("torch", "onnxruntime", "openvino"):
        assert reasons[backend] == "", reasons[backend]


def test_fp32_backends_agree(unet_files):
    patch = np.random.default_rng(3).random(PATCH, dtype=np.float32)
    with torch.no_grad():
        expected = unet_files["net"](torch.from_numpy(patch)).numpy()
    runtimes = [
        TorchRuntime.from_module(unet_files["net"]),
        create_runtime(unet_files["torchscript"], "torch"),
        create_runtime(unet_files["fp32"], "onnxruntime", threads=2),
        create_runtime(unet_files["fp32"], "openvino", precision="fp32", threads=2),
    ]
    for runtime in runtimes:
        output = runtime.predict(patch)
        assert output.shape == (1, 3, 32, 32, 32) and output.dtype == np.float32, runtime.name
        np.testing.assert_allclose(output, expected, atol=1e-4, err_msg=runtime.name)
        assert runtime.precision == "fp32"


def test_openvino_reshapes_per_patch_shape(unet_files):
    runtime = create_runtime(unet_files["fp32"], "openvino", precision="fp32", threads=2)
    for shape in [(2, 1, 16, 24, 32), PATCH, (2, 1, 16, 24, 32)]:
        patch = np.random.default_rng(4).random(shape, dtype=np.float32)
        with torch.no_grad():
            expected = unet_files["net"](torch.from_numpy(patch)).numpy()
        np.testing.assert_allclose(runtime.predict(patch), expected, atol=1e-4)


def test_openvino_fp32_sets_f32_hint_explicitly(unet_files):
    runtime = create_runtime(unet_files["fp32"], "openvino", precision="fp32", threads=1)
    runtime.predict(np.zeros(PATCH, np.float32))
    assert runtime.inference_precision() == "fp32"
    compiled = runtime._last_compiled
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert all(layer["precision"] != "bf16" for layer in runtime.layer_precisions())


def test_openvino_bf16_runs_bf16_convolutions_where_supported(unet_files):
    if "BF16" not in cpu_info()["openvino_capabilities"]:
        pytest.skip(f"this CPU has no BF16 support ({describe()})")
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and not any(word in cap for word in ("BF16", "AMX", "ALL")):
        pytest.skip(f"ONEDNN_MAX_CPU_ISA={cap} hides the CPU's BF16 kernels from OpenVINO")
    runtime = create_runtime(unet_files["fp32"], "openvino", precision="bf16", threads=2)
    runtime.predict(np.zeros(PATCH, np.float32))
    assert runtime.inference_precision() == "bf16" and runtime.precision == "bf16"
    precisions = {layer["precision"] for layer in runtime.layer_precisions()
                  if layer["type"] == "Convolution"}
    assert "bf16" in precisions


def test_layer_precisions_show_int8_convolutions_for_qdq(unet_files):
    if "INT8" not in cpu_info()["openvino_capabilities"]:
        pytest.skip(f"OpenVINO has no INT8 kernels on this CPU ({describe()})")
    quantized = create_runtime(unet_files["qdq"], "openvino", threads=2)
    assert quantized.precision == "int8"
    quantized.predict(np.zeros(PATCH, np.float32))
    layers = quantized.layer_precisions()
    summary = int8_summary(layers)
    assert summary["conv_total"] >= 10
    # Without VNNI transposed convolutions read float by design (int8_compat): int8 is no faster there.
    float_by_design = sum(layer["type"] == "Deconvolution" for layer in layers) \
        if path_here().float_deconvolution_inputs else 0
    assert summary["conv_int8"] == summary["conv_total"] - float_by_design, summary
    # oneDNN names its int8 kernels "..._i8" (AMX/VNNI) or "..._I8" (AVX2).
    assert all("i8" in layer["implementation"].lower() for layer in layers
               if layer["type"] == "Convolution"), summary

    float_model = create_runtime(unet_files["fp32"], "openvino", precision="fp32", threads=2)
    summary = int8_summary(float_model.layer_precisions())
    assert summary["conv_total"] >= 10 and summary["conv_int8"] == 0, summary
    assert summary["other_int8"] == 0


def test_openvino_int8_conv_matches_reference_qdq_math(qdq_conv_file, tmp_path):
    """OpenVINO's integer kernel computes what the Q/DQ graph it runs defines (ONNX Runtime as reference).

    On CPUs without int8 dot products OpenVINO runs the graph adapted for them
    (int8_compat); ONNX Runtime runs that same graph.
    """
    patch = np.random.default_rng(5).uniform(-1, 1, size=(1, 4, 16, 16, 16)).astype(np.float32)
    reference = create_runtime(as_run_here(qdq_conv_file, tmp_path), "onnxruntime")
    fast = create_runtime(qdq_conv_file, "openvino", threads=2)
    assert reference.precision == fast.precision == "int8"
    expected = reference.predict(patch)
    output = fast.predict(patch)
    np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    layers = [layer for layer in fast.layer_precisions() if layer["type"] == "Convolution"]
    assert len(layers) == 1 and layers[0]["precision"] in ("int8", "uint8"), layers


def test_int8_summary_counts_tensorrt_style_names():
    layers = [{"name": "a", "type": "CaskConvolution", "precision": "Int8", "implementation": "k1"},
              {"name": "b", "type": "CaskDeconvolution", "precision": "Half", "implementation": "k2"},
              {"name": "c", "type": "Reformat", "precision": "Int8", "implementation": ""},
              {"name": "d", "type": "Softmax", "precision": "Float", "implementation": ""}]
    summary = int8_summary(layers)
    assert (summary["conv_total"], summary["conv_int8"]) == (2, 1)
    assert (summary["other_total"], summary["other_int8"]) == (2, 1)
    assert summary["other_precisions"] == {"Int8": 1, "Float": 1}


def test_unknown_backend_names_the_valid_ones(unet_files):
    with pytest.raises(PTQError, match="Unknown backend 'tflite'.*onnxruntime.*openvino"):
        create_runtime(unet_files["fp32"], "tflite")


@pytest.mark.parametrize("backend,file_key", [("torch", "fp32"), ("onnxruntime", "torchscript"),
                                               ("openvino", "torchscript")])
def test_wrong_file_type_for_backend(unet_files, backend, file_key):
    with pytest.raises(PTQError, match=f"Backend '{backend}' runs"):
        create_runtime(unet_files[file_key], backend)


def test_precision_must_match_the_file(unet_files):
    with pytest.raises(PTQError, match="no quantization"):
        create_runtime(unet_files["fp32"], "openvino", precision="int8")
    with pytest.raises(PTQError, match="quantized"):
        create_runtime(unet_files["qdq"], "onnxruntime", precision="fp32")
    with pytest.raises(PTQError, match="cannot run precision 'bf16'.*fp32"):
        create_runtime(unet_files["fp32"], "onnxruntime", precision="bf16")


def test_not_torchscript_gives_ptq_error(tmp_path):
    bogus = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, str(bogus))
    with pytest.raises(PTQError, match="not a TorchScript file"):
        create_runtime(bogus, "torch")


def test_tensorrt_without_tensorrt_gives_ptq_error(unet_files):
    if available_backends()["tensorrt"] == "":
        pytest.skip("TensorRT is usable here")
    with pytest.raises(PTQError, match="TensorRT"):
        create_runtime(unet_files["fp32"], "tensorrt", precision="int8")


def test_cpuinfo_parsing():
    text = ("processor\t: 0\nmodel name\t: Example CPU\n"
            "flags\t\t: fpu sse avx2 avx512f avx512_vnni amx_int8\n")
    assert parse_cpuinfo(text) == {"model": "Example CPU",
                                   "isa": ["amx_int8", "avx512_vnni", "avx512f", "avx2"]}
    info = cpu_info()
    assert info["model"] and info["cores"] >= 1
    assert describe(info).startswith(info["model"])
