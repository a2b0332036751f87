"""The TensorRT path: what runs on the CPU here, and GPU tests that skip without a GPU.

CPU: the no-GPU behaviour (one clear PTQError, bench exit status 2), the
optimization profile, the FP16 ONNX conversion (run in ONNX Runtime against
the FP32 file), the checks done before TensorRT is touched, and the parser
of the engine inspector's JSON. GPU (``-m gpu`` on a machine with an NVIDIA
GPU, CUDA and TensorRT): engines built from the shipped model, INT8 vs FP32
Dice on a real volume, engine sizes, the engine cache and batching.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.runtimes.tensorrt_runtime import tensorrt_available
from SlicerPTQLib.tensorrt_build import (
    BuildSettings, convert_to_fp16, engine_for, onnx_input, parse_layer_information, profile_shapes)
from tensorrt_models import export_unet, ort_qdq

REPO = Path(__file__).resolve().parents[1]
USABLE, REASON = tensorrt_available()
needs_gpu = pytest.mark.skipif(not USABLE, reason=f"TensorRT cannot run here: {REASON}")
no_gpu_only = pytest.mark.skipif(USABLE, reason="TensorRT is usable here; the no-GPU path is not taken")


def _export(path: Path, dynamic_spatial: bool = True, batch_dynamic: bool = True) -> Path:
    return export_unet(path, (32, 32, 32), dynamic_spatial=dynamic_spatial, batch_dynamic=batch_dynamic)


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory) -> Path:
    return _export(tmp_path_factory.mktemp("trt") / "unet.fp32.onnx")


@pytest.fixture(scope="module")
def qdq_onnx(float_onnx, tmp_path_factory) -> Path:
    return ort_qdq(float_onnx, tmp_path_factory.mktemp("trt_qdq") / "unet.int8.onnx", (32, 32, 32), crops=2)


# -- no GPU here ---------------------------------------------------------------------------

@no_gpu_only
def test_tensorrt_available_says_what_is_missing():
    import torch

    assert USABLE is False and REASON
    if not torch.cuda.is_available():
        assert "no CUDA GPU found" in REASON
    if importlib.util.find_spec("tensorrt") is None:
        assert "TensorRT is not installed (pip install tensorrt-cu12)" in REASON


@no_gpu_only
def test_runtime_without_gpu_raises_one_clear_error(qdq_onnx):
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    with pytest.raises(PTQError) as raised:
        TensorRTRuntime(qdq_onnx, precision="int8", roi=(32, 32, 32))
    message = str(raised.value)
    assert REASON in message and "openvino" in message
    assert message.count("\n") == 0


@no_gpu_only
def test_create_runtime_tensorrt_without_gpu(qdq_onnx):
    from SlicerPTQLib.runtimes import create_runtime

    with pytest.raises(PTQError, match="TensorRT") as raised:
        create_runtime(qdq_onnx, "tensorrt")
    assert REASON in str(raised.value)


@no_gpu_only
def test_bench_gpu_exits_2_with_one_sentence():
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and REASON in run.stderr
    assert run.stdout == ""


def test_modules_import_without_loading_tensorrt_or_cuda():
    code = ("import sys; import SlicerPTQLib.runtimes.tensorrt_runtime, SlicerPTQLib.tensorrt_build, "
            "SlicerPTQLib.engine_cache, SlicerPTQLib.qdq_check; "
            "print('tensorrt' in sys.modules, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "False"]


# -- CPU parts of the builder ---------------------------------------------------------------

def test_profile_covers_batch_and_roi(float_onnx):
    profile = profile_shapes(float_onnx, BuildSettings(precision="fp32", roi=(32, 32, 32), max_batch=4))
    assert profile == {"input": "input", "min": [1, 1, 32, 32, 32], "opt": [4, 1, 32, 32, 32],
                       "max": [4, 1, 32, 32, 32]}
    ranged = profile_shapes(float_onnx, BuildSettings(precision="fp32", roi=(32, 32, 32), max_batch=2,
                                                      min_roi=(16, 16, 16), max_roi=(48, 48, 64)))
    assert ranged["min"] == [1, 1, 16, 16, 16] and ranged["max"] == [2, 1, 48, 48, 64]


def test_profile_keeps_fixed_dims(tmp_path):
    static = _export(tmp_path / "static.onnx", dynamic_spatial=False, batch_dynamic=False)
    assert onnx_input(static) == ("input", [1, 1, 32, 32, 32])
    profile = profile_shapes(static, BuildSettings(precision="fp32", roi=(32, 32, 32), max_batch=4))
    assert profile["min"] == profile["opt"] == profile["max"] == [1, 1, 32, 32, 32]
    with pytest.raises(PTQError, match="fixes spatial dim 0 to 32"):
        profile_shapes(static, BuildSettings(precision="fp32", roi=(64, 32, 32)))


@pytest.mark.parametrize("bad", [dict(precision="int4"), dict(max_batch=0), dict(optimization_level=7),
                                 dict(roi=(96, 96)), dict(workspace_mib=1)])
def test_build_settings_reject_bad_values(bad):
    with pytest.raises(PTQError):
        BuildSettings(**bad)


def test_fp16_model_matches_fp32_in_onnxruntime(float_onnx, tmp_path):
    import onnxruntime as ort

    fp16 = convert_to_fp16(float_onnx, tmp_path / "unet.fp16.onnx")
    model = onnx.load(str(fp16))
    float_type, half_type = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == float_type
    assert model.graph.output[0].type.tensor_type.elem_type == float_type
    inits = {init.name: init.data_type for init in model.graph.initializer}
    conv_weights = [inits[node.input[1]] for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose")]
    assert conv_weights and set(conv_weights) == {half_type}
    producers = {out: node for node in model.graph.node for out in node.output}
    norms = [node for node in model.graph.node if node.op_type == "InstanceNormalization"]
    assert norms and all(producers[node.input[0]].op_type == "Cast" for node in norms)
    assert [p.name for p in tmp_path.iterdir()] == ["unet.fp16.onnx"]

    x = np.random.default_rng(3).standard_normal((2, 1, 48, 32, 40)).astype(np.float32)
    reference = ort.InferenceSession(str(float_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    half = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert half.dtype == np.float32 and half.shape == reference.shape
    assert np.abs(half - reference).max() < 0.02 * max(1.0, np.abs(reference).max())
    assert (half.argmax(1) == reference.argmax(1)).mean() > 0.995


def test_fp16_conversion_refuses_a_qdq_model(qdq_onnx, tmp_path):
    with pytest.raises(PTQError, match="float ONNX"):
        convert_to_fp16(qdq_onnx, tmp_path / "x.onnx")


def test_engine_for_checks_the_model_before_tensorrt(float_onnx, qdq_onnx, tmp_path):
    settings = dict(roi=(32, 32, 32), max_batch=1)
    with pytest.raises(PTQError, match="no Q/DQ nodes"):
        engine_for(float_onnx, BuildSettings(precision="int8", **settings), cache_dir=tmp_path)
    with pytest.raises(PTQError, match="quantized"):
        engine_for(qdq_onnx, BuildSettings(precision="fp16", **settings), cache_dir=tmp_path)
    broken = onnx.load(str(qdq_onnx))
    zero_point = next(init for init in broken.graph.initializer if init.name == "input_zero_point")
    zero_point.CopyFrom(onnx.numpy_helper.from_array(np.int8(4), "input_zero_point"))
    broken_path = tmp_path / "broken.int8.onnx"
    onnx.save(broken, str(broken_path))
    with pytest.raises(PTQError, match="asymmetric"):
        engine_for(broken_path, BuildSettings(precision="int8", **settings), cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.int8.onnx"]


# Engine inspector output in the two documented schemas. TensorRT 10: tensors
# carry "Format/Datatype", weights "Weights": {"Type", "Count"}, and the engine
# lists "Bindings"; TensorRT 11 (NVIDIA's 10.x-to-11.x inspector migration
# page and the schema of its trt-perf-analysis tool) splits "Format" and
# "Datatype", lists weights as "Constants" tensors and I/O as "I/O Tensors".
_TRT10_LAYERS = {
    "Layers": [
        {"Name": "/conv1/Conv + /act/Relu", "LayerType": "CaskConvolution", "ParameterType": "Convolution",
         "Inputs": [{"Name": "in_q", "Dimensions": [1, 8, 32, 32, 32],
                     "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format with 3 "
                                        "spatial dimensions"}],
         "Outputs": [{"Name": "out", "Dimensions": [1, 8, 32, 32, 32],
                      "Format/Datatype": "Row major linear FP32"}],
         "Weights": {"Type": "Int8", "Count": 1728}, "Metadata": "[ONNX Layer: /conv1/Conv]"},
        {"Name": "Reformatting CopyNode for Input Tensor 0", "LayerType": "Reformat",
         "Inputs": [], "Outputs": []},
        {"Name": "/up/ConvTranspose", "LayerType": "CaskDeconvolutionV2", "ParameterType": "Convolution",
         "Inputs": [{"Name": "x", "Dimensions": [1, 16, 16, 16, 16],
                     "Format/Datatype": "Channel major FP16 format where channel % 8 == 0 with 3 spatial "
                                        "dimensions"}],
         "Outputs": [{"Name": "y", "Dimensions": [1, 8, 32, 32, 32], "Format/Datatype": "Row major linear FP32"}],
         "Weights": {"Type": "Half", "Count": 3456}, "Metadata": "[ONNX Layer: /up/ConvTranspose]"},
        {"Name": "/norm/InstanceNormalization", "LayerType": "Normalization",
         "Inputs": [{"Name": "y", "Dimensions": [1, 8, 32, 32, 32], "Format/Datatype": "Row major linear FP32"}],
         "Outputs": []},
    ],
    "Bindings": ["input", "output"],
}
_TRT11_LAYERS = {
    "Layers": [
        {"Name": "myl0_3", "LayerType": "kgen",
         "Inputs": [{"Name": "a", "Datatype": "Int8", "Format": "kDHWC32", "Dimensions": [1, 16, 16, 16, 16]}],
         "Outputs": [{"Name": "y", "Datatype": "Float", "Format": "kLINEAR"}],
         "Constants": [{"Name": "bias", "Datatype": "Float", "Dimensions": [8]},
                       {"Name": "w", "Datatype": "Int8", "Dimensions": [16, 8, 2, 2, 2]}],
         "Metadata": "[ONNX Layer: /up/ConvTranspose]\x1e[ONNX Layer: /up/ConvTranspose_output_0_QuantizeLinear]"},
        {"Name": "myl0_4", "LayerType": "kgen",
         "Inputs": [{"Name": "y_q", "Datatype": "Int8", "Format": "kDHWC32"}], "Outputs": [],
         "Constants": [{"Name": "w2", "Datatype": "Half", "Dimensions": [8, 8, 3, 3, 3]}],
         "Metadata": "[ONNX Layer: /up/ConvTranspose_output_0_DequantizeLinear]\x1e[ONNX Layer: /conv2/Conv]"},
        {"Name": "myl0_5", "LayerType": "kgen", "Inputs": [{"Name": "b", "Datatype": "Half"}], "Outputs": []},
    ],
    "I/O Tensors": [{"Name": "input", "IOMode": "Input", "DataType": "Float"}],
}
ONNX_OPS = {"/conv1/Conv": "Conv", "/up/ConvTranspose": "ConvTranspose", "/conv2/Conv": "Conv"}


def test_layer_information_from_tensorrt10_json():
    layers = parse_layer_information(json.dumps(_TRT10_LAYERS), ONNX_OPS)
    assert [layer["name"] for layer in layers] == ["/conv1/Conv + /act/Relu", "/up/ConvTranspose",
                                                   "/norm/InstanceNormalization"]
    conv, deconv, norm = layers
    assert (conv["type"], conv["precision"]) == ("Convolution", "int8") and "convtranspose" not in conv
    assert (deconv["type"], deconv["precision"], deconv["convtranspose"]) == ("Deconvolution", "fp16", "yes")
    assert "not INT8" in deconv["note"]
    assert norm["precision"] == "fp32"


def test_layer_information_from_tensorrt11_json():
    deconv, conv, other = parse_layer_information(json.dumps(_TRT11_LAYERS), ONNX_OPS)
    assert (deconv["type"], deconv["precision"], deconv["convtranspose"]) == ("Deconvolution", "int8", "yes")
    assert "note" not in deconv
    # The Conv reading the ConvTranspose's dequantized output is a Conv, by exact ONNX names.
    assert (conv["type"], conv["precision"]) == ("Convolution", "fp16") and "convtranspose" not in conv
    assert other["precision"] == "fp16"


def test_layer_information_needs_detailed_verbosity():
    with pytest.raises(PTQError, match="DETAILED"):
        parse_layer_information(json.dumps({"Layers": ["conv1", "conv2"]}))


# -- GPU ----------------------------------------------------------------------------------

def _gpu_data(what, fetch):
    """Fetch test data for a GPU test: a machine that can run TensorRT must have it, so a miss FAILS."""
    from SlicerPTQLib import shipped

    try:
        return fetch(shipped)
    except PTQError as exc:
        pytest.fail(f"TensorRT runs here but the {what} for its tests is missing: {exc}")


@pytest.fixture(scope="module")
def shipped_qdq(tmp_path_factory):
    from SlicerPTQLib.pipeline import quantize

    model = _gpu_data("shipped model", lambda shipped: shipped.shipped_model())
    calibration = _gpu_data("calibration volumes", lambda shipped: shipped.calibration_volumes())
    return quantize(model, calibration[:3], out_dir=tmp_path_factory.mktemp("shipped_trt"),
                    method="max", num_crops=8, placement="tensorrt")


@pytest.fixture(scope="module")
def gpu_evaluation_cases():
    return _gpu_data("evaluation volumes", lambda shipped: shipped.evaluation_volumes())


def _real_patches(spec, volume_path, count):
    """``count`` roi-sized float32 patches of a real preprocessed volume: its centre, then mirrored copies."""
    from SlicerPTQLib.preprocess import prepare
    from SlicerPTQLib.volumes import read_volume

    image, _ = prepare(read_volume(volume_path), spec)
    roi = tuple(spec.roi_size)
    image = np.pad(image, [(0, 0)] + [(0, max(0, r - s)) for s, r in zip(image.shape[1:], roi)])
    starts = [(s - r) // 2 for s, r in zip(image.shape[1:], roi)]
    centre = image[:, starts[0]:starts[0] + roi[0], starts[1]:starts[1] + roi[1], starts[2]:starts[2] + roi[2]]
    patches = [centre if index == 0 else np.flip(centre, axis=1 + (index - 1) % 3) for index in range(count)]
    return np.ascontiguousarray(np.stack(patches), dtype=np.float32)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.mark.gpu
@needs_gpu
def test_int8_engine_agrees_with_fp32_and_is_smaller(shipped_qdq, gpu_evaluation_cases, engine_dir):
    from SlicerPTQLib.inference import segment_volume
    from SlicerPTQLib.metrics import mean_dice
    from SlicerPTQLib.runtimes import int8_summary
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime
    from SlicerPTQLib.volumes import read_volume

    spec = shipped_qdq.spec
    volume = read_volume(gpu_evaluation_cases[0][1])
    runtimes = {precision: TensorRTRuntime(path, precision=precision, roi=spec.roi_size, max_batch=1,
                                           cache_dir=engine_dir)
                for precision, path in (("fp32", shipped_qdq.fp32_onnx), ("int8", shipped_qdq.quantized_onnx))}
    try:
        labels = {precision: segment_volume(runtime, volume, spec)[0].array for precision, runtime in runtimes.items()}
        assert labels["fp32"].any()
        assert mean_dice(labels["int8"], labels["fp32"]) >= 0.99
        sizes = {precision: runtime.engine_path.stat().st_size for precision, runtime in runtimes.items()}
        # Engines also hold kernel code, which INT8 does not shrink: ask for at least a third of the
        # 3 bytes per weight that INT8 storage saves, not a ratio of whole files.
        weights = sum(int(np.prod(init.dims)) for init in onnx.load(str(shipped_qdq.fp32_onnx)).graph.initializer)
        assert sizes["fp32"] - sizes["int8"] >= weights, (sizes, weights)
        summary = int8_summary(runtimes["int8"].layer_precisions())
        assert summary["conv_int8"] > 0, summary
        assert int8_summary(runtimes["fp32"].layer_precisions())["conv_int8"] == 0
    finally:
        for runtime in runtimes.values():
            runtime.close()


@pytest.mark.gpu
@needs_gpu
def test_second_load_is_a_cache_hit_and_batches_are_chunked(shipped_qdq, gpu_evaluation_cases, engine_dir):
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    spec = shipped_qdq.spec
    first = TensorRTRuntime(shipped_qdq.quantized_onnx, roi=spec.roi_size, max_batch=2, cache_dir=engine_dir)
    second = TensorRTRuntime(shipped_qdq.quantized_onnx, roi=spec.roi_size, max_batch=2, cache_dir=engine_dir)
    try:
        assert second.built is False and second.engine_path == first.engine_path
        assert first.precision == "int8" and first.max_batch == 2
        patches = _real_patches(spec, gpu_evaluation_cases[0][1], 3)
        together = second.predict(patches)
        one_by_one = np.concatenate([second.predict(patches[i:i + 1]) for i in range(3)])
        assert together.shape == (3, spec.out_channels, *spec.roi_size)
        np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    finally:
        first.close()
        second.close()


@pytest.mark.gpu
@needs_gpu
def test_fp16_engine_tracks_fp32(shipped_qdq, gpu_evaluation_cases, engine_dir):
    from SlicerPTQLib.runtimes.tensorrt_runtime import TensorRTRuntime

    spec = shipped_qdq.spec
    patch = _real_patches(spec, gpu_evaluation_cases[0][1], 1)  # argmax agreement means nothing on noise
    outputs = {}
    for precision in ("fp32", "fp16"):
        runtime = TensorRTRuntime(shipped_qdq.fp32_onnx, precision=precision, roi=spec.roi_size, max_batch=1,
                                  cache_dir=engine_dir)
        try:
            outputs[precision] = runtime.predict(patch)
            assert runtime.precision == precision
        finally:
            runtime.close()
    assert (outputs["fp16"].argmax(1) == outputs["fp32"].argmax(1)).mean() > 0.99
