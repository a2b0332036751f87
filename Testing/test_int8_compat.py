"""INT8 on CPUs without int8 dot products: the adapted graph, and OpenVINO on every ISA reachable here.

oneDNN honours ``ONEDNN_MAX_CPU_ISA``, so a machine with AMX also runs the
AVX-512 VNNI and the AVX2 (no VNNI) paths in a subprocess; a lower ISA
cannot be raised, so on an AVX2 machine every case runs the AVX2 path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from SlicerPTQLib.export import export_onnx  # noqa: E402
from SlicerPTQLib.int8_compat import (SAFE_PAIR_SUM, SAFE_WEIGHT_MAX, adapted_model, as_run_here,  # noqa: E402
                                      int8_path)
from SlicerPTQLib.qdq import quantize_onnx  # noqa: E402
from SlicerPTQLib.runtimes import create_runtime  # noqa: E402
from SlicerPTQLib.runtimes.onnxruntime_runtime import OnnxRuntimeRuntime  # noqa: E402

ROI = (32, 32, 32)


class ConcatUNet(torch.nn.Module):
    """Conv3d + LeakyReLU, no norm, nearest upsampling, Concat skips: the held-out net's shape."""

    def __init__(self, channels=(16, 32, 64)):
        super().__init__()

        def block(c_in, c_out):
            return torch.nn.Sequential(torch.nn.Conv3d(c_in, c_out, 3, padding=1), torch.nn.LeakyReLU(0.01),
                                       torch.nn.Conv3d(c_out, c_out, 3, padding=1), torch.nn.LeakyReLU(0.01))

        self.down = torch.nn.ModuleList(block(1 if i == 0 else channels[i - 1], c) for i, c in enumerate(channels))
        self.up = torch.nn.ModuleList(block(channels[i] + channels[i - 1], channels[i - 1])
                                      for i in range(len(channels) - 1, 0, -1))
        self.head = torch.nn.Conv3d(channels[0], 2, 1)

    def forward(self, x):
        skips = []
        for index, layer in enumerate(self.down):
            x = layer(x)
            if index < len(self.down) - 1:
                skips.append(x)
                x = torch.nn.functional.max_pool3d(x, 2)
        for layer in self.up:
            x = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = layer(torch.cat([x, skips.pop()], 1))
        return self.head(x)


@pytest.fixture(scope="module")
def concat_unet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concat_unet")
    torch.manual_seed(0)
    fp32 = export_onnx(ConcatUNet().eval(), folder / "net.fp32.onnx", 1, (1, 1, *ROI), dynamic_spatial=True)
    rng = np.random.default_rng(0)
    crops = [rng.standard_normal((1, *ROI)).astype(np.float32) for _ in range(4)]
    quantize_onnx(fp32, folder / "net.int8.onnx", crops)
    np.save(folder / "patch.npy", rng.standard_normal((1, 1, *ROI)).astype(np.float32))
    return folder


_RUN_ON_ISA = """
import json, sys
import numpy as np
from pathlib import Path
from SlicerPTQLib.int8_compat import as_run_here
from SlicerPTQLib.runtimes import create_runtime
folder = Path(sys.argv[1])
patch = np.load(folder / "patch.npy")
openvino = create_runtime(folder / "net.int8.onnx", "openvino", threads=2)
output = openvino.predict(patch)
reference = create_runtime(as_run_here(folder / "net.int8.onnx", sys.argv[2]), "onnxruntime").predict(patch)
fp32 = create_runtime(folder / "net.fp32.onnx", "onnxruntime").predict(patch)
print(json.dumps({
    "adaptation": openvino.int8_adaptation,
    "kernels": sorted({layer["implementation"] for layer in openvino.layer_precisions()
                       if layer["type"] == "Convolution"}),
    "max_diff_vs_graph_run": float(np.abs(output - reference).max() / np.abs(reference).max()),
    "correlation_vs_fp32": float(np.corrcoef(output.ravel(), fp32.ravel())[0, 1]),
    "agreement_vs_fp32": float((output.argmax(1) == fp32.argmax(1)).mean()),
}))
"""


@pytest.mark.parametrize("isa", ["native", "AVX512_CORE_VNNI", "AVX2"])
def test_openvino_int8_matches_the_graph_it_runs_on_each_isa(concat_unet, tmp_path, isa):
    """Concat -> signed int8 -> Conv was wrong on AVX2 (correlation 0.96, empty masks on real nets)."""
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", _RUN_ON_ISA, str(concat_unet), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(isa, result)  # which kernels this ISA ran, for the log
    assert result["max_diff_vs_graph_run"] < 1e-2, result
    assert result["correlation_vs_fp32"] > 0.999, result
    assert result["agreement_vs_fp32"] >= 0.99, result
    if isa != "native":
        assert not result["adaptation"].startswith("none"), result   # adapted, with counts


def _changes(flags, environ=None):
    path = int8_path(flags, environ or {})
    return path.shift_activations, path.pair_safe_weights


def test_int8_path_follows_the_cpu_flags_and_the_onednn_cap():
    assert _changes(["amx_int8", "avx512_vnni", "avx2"]) == (False, False)
    assert _changes(["avx512_vnni", "avx2"]) == (True, False)
    assert _changes(["avx_vnni", "avx2"]) == (True, False)
    assert _changes(["avx2"]) == (True, True)
    assert _changes([]) == (True, True)   # unknown CPU: the adapted graph is right everywhere
    assert _changes(["amx_int8"], {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}) == (True, False)
    assert _changes(["amx_int8"], {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}) == (False, False)
    capped = int8_path(["amx_int8", "avx2"], {"ONEDNN_MAX_CPU_ISA": "avx2"})
    assert (capped.shift_activations, capped.pair_safe_weights) == (True, True)
    assert "ONEDNN_MAX_CPU_ISA=AVX2 hides amx_int8" in capped.reason
    assert _changes(["avx2"], {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}) == (True, True)   # a cap never raises


def _qdq_conv(weight: np.ndarray, scale: np.ndarray) -> "onnx.ModelProto":
    """x -> int8 Q/DQ -> Conv with the given int8 weight (per output channel scales)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wdq"], axis=0),
             helper.make_node("Conv", ["xdq", "wdq"], ["y"], pads=[1] * 6)]
    inits = [numpy_helper.from_array(np.array(0.03, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "ws"),
             numpy_helper.from_array(np.zeros(scale.shape, np.int8), "wz")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_adapted_graph_keeps_the_activation_grid_and_fitting_weights(tmp_path):
    rng = np.random.default_rng(3)
    weight = rng.integers(-SAFE_WEIGHT_MAX, SAFE_WEIGHT_MAX + 1, (3, 4, 3, 3, 3)).astype(np.int8)
    original = _qdq_conv(weight, np.array([0.01, 0.02, 0.03], np.float32))
    onnx.save(original, tmp_path / "a.onnx")
    adapted, changes = adapted_model(onnx.load(tmp_path / "a.onnx"))
    onnx.save(adapted, tmp_path / "b.onnx")
    assert changes == {"activation_pairs": 1, "weights_requantized": 0, "float_deconvolution_inputs": 0}
    zero_points = {numpy_helper.to_array(t).dtype for t in adapted.graph.initializer if t.name.startswith("z")}
    assert zero_points == {np.dtype(np.uint8)}   # the unused int8 zero point is gone
    patch = rng.uniform(-4, 4, (1, 4, 8, 8, 8)).astype(np.float32)
    before = create_runtime(tmp_path / "a.onnx", "onnxruntime").predict(patch)
    after = create_runtime(tmp_path / "b.onnx", "onnxruntime").predict(patch)
    np.testing.assert_array_equal(before, after)   # uint8 - 128 is the same grid as int8


def test_pairs_only_a_norm_reads_stay_signed_and_run_right_in_openvino(tmp_path):
    # Signed, OpenVINO fuses the quantize and runs MVN on int8; shifted, it keeps an f32 FakeQuantize.
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"]),
             helper.make_node("InstanceNormalization", ["xdq", "gamma", "beta"], ["y"])]
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.array([1.0, 0.5, 2.0, 1.5], np.float32), "gamma"),
             numpy_helper.from_array(np.array([0.0, 0.1, -0.2, 0.3], np.float32), "beta")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    adapted, changes = adapted_model(model)
    assert changes["activation_pairs"] == 0
    assert numpy_helper.to_array(next(t for t in adapted.graph.initializer if t.name == "z")).dtype == np.int8
    onnx.save(adapted, tmp_path / "norm.onnx")
    patch = np.random.default_rng(5).uniform(-6, 6, (1, 4, 8, 8, 8)).astype(np.float32)
    openvino = create_runtime(tmp_path / "norm.onnx", "openvino", threads=2).predict(patch)
    reference = create_runtime(tmp_path / "norm.onnx", "onnxruntime").predict(patch)
    np.testing.assert_allclose(openvino, reference, atol=1e-3)


def _pair_peaks(q: np.ndarray) -> np.ndarray:
    """Per output channel, the largest same-sign sum of input channels 2k, 2k+1 at one tap."""
    pairs = q.astype(int).reshape(q.shape[0], q.shape[1] // 2, 2, -1)
    return np.maximum(np.clip(pairs, 0, None).sum(2), np.clip(-pairs, 0, None).sum(2)).reshape(q.shape[0], -1).max(1)


def test_channels_are_rescaled_only_where_a_pair_could_overflow(tmp_path):
    weight = np.zeros((3, 4, 3, 3, 3), np.int8)
    weight[0, 0, 0, 0, 0], weight[0, 1, 0, 0, 0] = 127, 60                   # one pair, same sign: 187 > 128
    weight[1, 0, 0, 0, 0], weight[1, 1, 1, 1, 1] = 127, 127                  # different taps: never summed
    weight[1, 2, 2, 2, 2], weight[1, 3, 2, 2, 2] = 127, -128                 # opposite signs: no overflow
    weight[2, 1, 0, 0, 0], weight[2, 2, 0, 0, 0] = 127, 127                  # channels 1 and 2 are no pair
    scale = np.array([0.01, 0.02, 0.03], np.float32)
    adapted, changes = adapted_model(_qdq_conv(weight.copy(), scale.copy()))
    assert changes["weights_requantized"] == 1
    values = {t.name: numpy_helper.to_array(t) for t in adapted.graph.initializer}
    new_q, new_scale = values["w"], values["ws"]
    assert _pair_peaks(new_q).max() <= SAFE_PAIR_SUM
    np.testing.assert_array_equal(new_q[1:], weight[1:])                     # fitted already: untouched
    np.testing.assert_array_equal(new_scale[1:], scale[1:])
    assert new_scale[0] == pytest.approx(scale[0] * 187 / (SAFE_PAIR_SUM - 1))   # just enough, not 2x
    dequantized = new_q[0].astype(np.float32) * new_scale[0]
    np.testing.assert_allclose(dequantized, weight[0].astype(np.float32) * scale[0], atol=new_scale[0] + 1e-7)


def test_weights_of_an_unprobed_reader_go_to_seven_bits():
    model = _qdq_conv(np.full((2, 4, 3, 3, 3), 100, np.int8), np.array([0.01, 0.02], np.float32))
    next(node for node in model.graph.node if node.op_type == "Conv").op_type = "Gemm"   # pairing never probed
    adapted, changes = adapted_model(model)
    assert changes["weights_requantized"] == 1
    new_q = numpy_helper.to_array(next(t for t in adapted.graph.initializer if t.name == "w"))
    assert np.abs(new_q.astype(int)).max() <= SAFE_WEIGHT_MAX


def test_rescaled_rounding_keeps_each_kernels_sum(tmp_path):
    weight = np.random.default_rng(3).integers(-127, 128, (6, 6, 3, 3, 3)).astype(np.int8)
    scale = np.linspace(0.01, 0.06, 6).astype(np.float32)
    adapted, _ = adapted_model(_qdq_conv(weight.copy(), scale.copy()))
    values = {t.name: numpy_helper.to_array(t) for t in adapted.graph.initializer}
    exact = weight.astype(np.float64) * scale[:, None, None, None, None] / values["ws"][:, None, None, None, None]
    new_q = values["w"].astype(np.float64)
    assert _pair_peaks(values["w"]).max() <= SAFE_PAIR_SUM
    assert np.all((new_q == np.floor(exact)) | (new_q == np.ceil(exact)))  # each tap one step at most
    kernel_sums = new_q.reshape(6, 6, -1).sum(-1), exact.reshape(6, 6, -1).sum(-1)
    assert np.abs(kernel_sums[0] - kernel_sums[1]).max() <= 0.5 + 1e-9        # the kernel's sum to nearest
    nearest_sums = np.round(exact).reshape(6, 6, -1).sum(-1)
    assert np.abs(nearest_sums - kernel_sums[1]).max() > 1                      # rounding each tap would not


def _pair_limit_model(kind: str, rng) -> "tuple":
    """One Conv / ConvTranspose / MatMul whose weight pairs reach past int16 at the top of the input grid."""
    # OpenVINO sums int8 pairs on AVX2 in a FullyConnected this wide (a narrow one runs jit_gemm, which does not).
    reduced, outputs = (64, 64) if kind == "MatMul" else (8, 6)
    weight = rng.integers(-128, 128, (reduced, outputs)).astype(np.int8)
    weight[0::2, 0], weight[1::2, 0] = 127, 100                              # same-sign pairs, 227
    weight[0::2, 1], weight[1::2, 1] = -128, -90
    if kind == "MatMul":
        shape, axis, node = [1, 1, 4, 8, reduced], 1, helper.make_node("MatMul", ["xdq", "wdq"], ["y"])
    elif kind == "Conv":
        weight = np.repeat(weight.T[:, :, None, None, None], 2, axis=2)        # (out, in, 2, 1, 1)
        shape, axis, node = [1, reduced, 4, 4, 4], 0, helper.make_node("Conv", ["xdq", "wdq"], ["y"])
    else:
        weight = np.repeat(weight[:, :, None, None, None], 2, axis=2)          # (in, out, 2, 1, 1)
        shape, axis = [1, reduced, 4, 4, 4], 1
        node = helper.make_node("ConvTranspose", ["xdq", "wdq"], ["y"], strides=[2, 1, 1])
    scale = 0.05
    # OpenVINO runs a MatMul as an int8 FullyConnected on a 3-D input (a 5-D one stays float).
    flat = [helper.make_node("Reshape", ["x", "flat"], ["xflat"])] if kind == "MatMul" else []
    nodes = flat + [helper.make_node("QuantizeLinear", ["xflat" if flat else "x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wdq"], axis=axis), node]
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"), numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(np.full(outputs, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(outputs, np.int8), "wz"),
             numpy_helper.from_array(np.array([1, 32, reduced], np.int64), "flat")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    patch = rng.uniform(-1, 1, shape).astype(np.float32) * 127 * scale
    if kind == "MatMul":
        patch[..., 0, :] = 127 * scale                                         # one row at the top of the grid
    else:
        patch[..., 0] = 127 * scale                                            # one plane at the top of the grid
    return model, patch


_PAIRS_ON_ISA = """
import json, sys
import numpy as np, onnx
from pathlib import Path
from SlicerPTQLib.int8_compat import adapted_model, as_run_here, path_here
from SlicerPTQLib.runtimes import create_runtime
from SlicerPTQLib.runtimes.openvino_runtime import OpenVINORuntime
folder = Path(sys.argv[1])
for kind in ("Conv", "ConvTranspose", "MatMul"):
    model, patch = folder / f"{kind}.onnx", np.load(folder / f"{kind}.npy")
    as_run_here(model, folder / "here").rename(folder / f"{kind}.here.onnx")
    np.save(folder / f"{kind}.here.out.npy", create_runtime(model, "openvino", threads=2).predict(patch))
    # The control: activations shifted, weights as they are; where pairs sum in int16 this must go wrong.
    shifted, _ = adapted_model(onnx.load(model), True, False)
    onnx.save(shifted, folder / f"{kind}.shifted.onnx")
    output = OpenVINORuntime(folder / f"{kind}.shifted.onnx", threads=2, adapt_int8=False).predict(patch)
    np.save(folder / f"{kind}.shifted.out.npy", output)
print(json.dumps({"pairs_summed_in_int16": path_here().pair_safe_weights}))
"""


def _exact_qdq_output(model_file: Path, patch: np.ndarray) -> np.ndarray:
    """The Q/DQ graph's arithmetic in float64 (ONNX Runtime's int8 MatMul saturates on AVX2 itself)."""
    model = onnx.load(model_file)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {node.op_type: node for node in model.graph.node}
    x = patch.reshape(1, 32, -1) if "MatMul" in nodes else patch
    if "QuantizeLinear" in nodes:   # else the op reads its input in float
        quantize = nodes["QuantizeLinear"]
        scale, zero = float(values[quantize.input[1]]), values[quantize.input[2]]
        low, high = (0, 255) if zero.dtype == np.uint8 else (-128, 127)
        x = (np.clip(np.round(x / scale) + int(zero), low, high) - int(zero)) * scale
    dequantize = next(node for node in model.graph.node if node.op_type == "DequantizeLinear" and node.input[0] == "w")
    axis = next(attr.i for attr in dequantize.attribute if attr.name == "axis")
    shape = [1] * values["w"].ndim
    shape[axis] = -1
    w = torch.from_numpy(values["w"].astype(np.float64) * values[dequantize.input[1]].reshape(shape))
    x = torch.from_numpy(x.astype(np.float64))
    if "MatMul" in nodes:
        return (x @ w).numpy()
    if "Conv" in nodes:
        return torch.nn.functional.conv3d(x, w).numpy()
    return torch.nn.functional.conv_transpose3d(x, w, stride=(2, 1, 1)).numpy()


def test_transposed_convolutions_read_float_where_asked(tmp_path):
    model, _ = _pair_limit_model("ConvTranspose", np.random.default_rng(7))
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    kept, changes = adapted_model(onnx.load_from_string(model.SerializeToString()))
    assert changes["float_deconvolution_inputs"] == 0 and changes["weights_requantized"] == 1
    assert [node.op_type for node in kept.graph.node].count("QuantizeLinear") == 1
    adapted, changes = adapted_model(model, float_deconvolution_inputs=True)
    assert changes["float_deconvolution_inputs"] == 1 and changes["activation_pairs"] == 0
    # Over a float input the weights keep their full grid: no int16 pair sums there.
    assert changes["weights_requantized"] == 0
    assert np.array_equal(numpy_helper.to_array(next(t for t in adapted.graph.initializer if t.name == "w")), weight)
    assert [node.op_type for node in adapted.graph.node] == ["DequantizeLinear", "ConvTranspose"]
    assert next(node for node in adapted.graph.node if node.op_type == "ConvTranspose").input[0] == "x"
    assert not {"s", "z"} & {tensor.name for tensor in adapted.graph.initializer}   # nothing left for ORT to warn on
    assert int8_path(["avx2"]).float_deconvolution_inputs and not int8_path(["avx512_vnni"]).float_deconvolution_inputs


@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_openvino_int8_is_exact_at_the_pair_limit_on_each_isa(tmp_path, isa):
    """Weight pairs past int16 at the top of the input grid: OpenVINO computes the graph it runs exactly."""
    rng = np.random.default_rng(7)
    (tmp_path / "here").mkdir()
    for kind in ("Conv", "ConvTranspose", "MatMul"):
        model, patch = _pair_limit_model(kind, rng)
        onnx.save(model, tmp_path / f"{kind}.onnx")
        np.save(tmp_path / f"{kind}.npy", patch)
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, "-c", _PAIRS_ON_ISA, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summed_in_int16 = json.loads(done.stdout.strip().splitlines()[-1])["pairs_summed_in_int16"]
    errors = {}
    for kind in ("Conv", "ConvTranspose", "MatMul"):
        patch = np.load(tmp_path / f"{kind}.npy")
        for form in ("here", "shifted"):
            exact = _exact_qdq_output(tmp_path / f"{kind}.{form}.onnx", patch)
            output = np.load(tmp_path / f"{kind}.{form}.out.npy").reshape(exact.shape)
            errors[f"{kind} {form}"] = float(np.abs(output - exact).max() / np.abs(exact).max())
    if isa == "native":
        # ONNX Runtime fits its own MatMul weights where it sums pairs in int16, as OpenVINO's; its Conv is exact.
        for kind in ("Conv", "ConvTranspose", "MatMul"):
            patch = np.load(tmp_path / f"{kind}.npy")
            exact = _exact_qdq_output(tmp_path / (f"{kind}.here.onnx" if kind == "MatMul" else f"{kind}.onnx"), patch)
            output = create_runtime(tmp_path / f"{kind}.onnx", "onnxruntime").predict(patch).reshape(exact.shape)
            errors[f"{kind} onnxruntime"] = float(np.abs(output - exact).max() / np.abs(exact).max())
            # The file as OpenVINO runs it here needs no more fitting: the self-check's reference takes it as it is.
            here = tmp_path / f"{kind}.here.onnx"
            exact = _exact_qdq_output(here, patch)
            output = OnnxRuntimeRuntime(here, adapt_int8=False).predict(patch).reshape(exact.shape)
            errors[f"{kind} onnxruntime as run here"] = float(np.abs(output - exact).max() / np.abs(exact).max())
    print(isa, summed_in_int16, errors)
    for kind in ("Conv", "ConvTranspose", "MatMul"):
        assert errors[f"{kind} here"] < 1e-4, errors
        assert errors.get(f"{kind} onnxruntime", 0.0) < 1e-4, errors
        assert errors.get(f"{kind} onnxruntime as run here", 0.0) < 1e-4, errors
        if summed_in_int16:
            assert errors[f"{kind} shifted"] > 1e-2, errors   # the rule is what keeps it exact


def test_as_run_here_returns_the_file_itself_where_nothing_is_adapted(concat_unet, tmp_path):
    assert as_run_here(concat_unet / "net.int8.onnx", tmp_path, adapt=False) == concat_unet / "net.int8.onnx"
    written = as_run_here(concat_unet / "net.int8.onnx", tmp_path, adapt=True)
    assert written.parent == tmp_path and written.is_file()
