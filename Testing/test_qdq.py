"""Q/DQ insertion: graph structure, verbatim weights, float fallbacks, real-model agreement."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from SlicerPTQLib.calibration import sample_crops
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.export import export_onnx
from SlicerPTQLib.onnx_graph import cpu_session
from SlicerPTQLib.qdq import FLOAT_OPS, PLACEMENTS, quantize_onnx
from SlicerPTQLib.qdq_check import ERROR, check_qdq

INT8 = onnx.TensorProto.INT8


class Graph:
    """Lookup tables over a saved QDQ model."""

    def __init__(self, path: Path):
        self.model = onnx.load(str(path))
        graph = self.model.graph
        self.init = {t.name: t for t in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.readers = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.nodes = list(graph.node)

    def array(self, name):
        return numpy_helper.to_array(self.init[name])

    def dequantized_from(self, tensor):
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def of_type(self, *types):
        return [node for node in self.nodes if node.op_type in types]


def axis_of(node):
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def check_weight(graph, node, weight_shape, axis):
    """The weight of ``node`` is an int8 initializer -> per-channel (axis None: per-tensor) DequantizeLinear."""
    dq = graph.dequantized_from(node.input[1])
    assert dq is not None, node.name
    q_name, scale_name, zp_name = dq.input
    assert graph.init[q_name].data_type == INT8
    assert tuple(graph.init[q_name].dims) == tuple(weight_shape)
    scales, zero_points = graph.array(scale_name), graph.array(zp_name)
    if axis is None:  # one scale for the whole weight (ConvTranspose under "tensorrt")
        assert "axis" not in [a.name for a in dq.attribute] and scales.shape == () and scales > 0
    else:
        assert axis_of(dq) == axis
        assert scales.shape == (weight_shape[axis],) and np.all(scales > 0)
    assert zero_points.dtype == np.int8 and not zero_points.any()
    return graph.array(q_name), scales


def check_conv_input(graph, node, weight_shape, placement):
    """Int8 input, or float for narrow convs (the one-channel stem) under "cpu"."""
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    channels = weight_shape[1] if node.op_type == "Conv" else weight_shape[0] // group
    if channels >= PLACEMENTS[placement].min_input_channels:
        check_activation(graph, node.input[0])
    else:
        assert graph.dequantized_from(node.input[0]) is None, node.name


def check_activation(graph, tensor):
    """``tensor`` comes from a symmetric per-tensor int8 Q -> DQ pair."""
    dq = graph.dequantized_from(tensor)
    assert dq is not None, tensor
    q = graph.producer[dq.input[0]]
    assert q.op_type == "QuantizeLinear" and list(q.input[1:]) == list(dq.input[1:])
    scale, zero_point = graph.array(dq.input[1]), graph.array(dq.input[2])
    assert scale.shape == () and scale > 0
    assert zero_point.dtype == np.int8 and zero_point == 0


# ---- a small real MONAI UNet (random weights) for structure ----------------

@pytest.fixture(scope="module")
def unet_onnx(tmp_path_factory):
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(3, 1, 3, channels=(16, 32, 64), strides=(2, 2), num_res_units=1).eval()
    folder = tmp_path_factory.mktemp("unet")
    path = export_onnx(net, folder / "unet.fp32.onnx", 1, (1, 1, 32, 32, 32))
    rng = np.random.default_rng(0)
    crops = sample_crops([rng.normal(size=(1, 48, 48, 48)).astype(np.float32)], (32, 32, 32), 3, seed=0)
    return path, crops


@pytest.fixture(scope="module", params=["cpu", "tensorrt"])
def unet_int8(request, unet_onnx, tmp_path_factory):
    fp32, crops = unet_onnx
    out = tmp_path_factory.mktemp("q") / f"unet.{request.param}.int8.onnx"
    report = quantize_onnx(fp32, out, crops, method="max", placement=request.param)
    return request.param, fp32, out, report, crops


def test_every_conv_has_int8_weights_and_int8_inputs(unet_int8):
    placement, fp32, out, report, _ = unet_int8
    float_graph, graph = Graph(fp32), Graph(out)
    weighted = float_graph.of_type("Conv", "ConvTranspose")
    assert weighted and len(graph.of_type("Conv", "ConvTranspose")) == len(weighted)
    for node in graph.of_type("Conv", "ConvTranspose"):
        original = next(n for n in weighted if n.name == node.name)
        shape = tuple(float_graph.init[original.input[1]].dims)
        axis = 0 if node.op_type == "Conv" else PLACEMENTS[placement].conv_transpose_axis
        check_weight(graph, node, shape, axis)
        check_conv_input(graph, node, shape, placement)
        assert original.input[1] not in graph.init  # no float copy of the weight left
        for bias in node.input[2:]:
            assert graph.init[bias].data_type == onnx.TensorProto.FLOAT
    assert report.quantized_weights == len(weighted)
    assert report.quantized_ops["Conv"] == len(float_graph.of_type("Conv"))
    assert report.quantized_ops["ConvTranspose"] == len(float_graph.of_type("ConvTranspose"))
    assert len(report.activation_amax) == len(graph.of_type("QuantizeLinear"))
    assert all(finding.severity != ERROR for finding in
               check_qdq(out, "tensorrt" if placement == "tensorrt" else "openvino"))


def test_placement_specific_pairs(unet_int8):
    placement, _, out, _, _ = unet_int8
    graph = Graph(out)
    for dq in graph.of_type("DequantizeLinear"):
        assert graph.readers.get(dq.output[0]), "a Q/DQ pair nobody reads"
    for node in graph.nodes:
        if node.op_type in FLOAT_OPS:
            assert not any(graph.dequantized_from(name) for name in node.input)
    quantized_outputs = {graph.producer[q.input[0]].op_type for q in graph.of_type("QuantizeLinear")
                         if q.input[0] in graph.producer}
    assert "ConvTranspose" in quantized_outputs
    if placement == "cpu":
        # Dense: the norm/activation outputs and Concat inputs are int8 too.
        assert {"InstanceNormalization", "PRelu"} <= quantized_outputs
        for concat in graph.of_type("Concat"):
            for name in concat.input:
                check_activation(graph, name)
    else:
        assert "InstanceNormalization" not in quantized_outputs


def test_int8_file_is_small_and_runs_close_to_fp32(unet_int8):
    _, fp32, out, report, crops = unet_int8
    # 0.25 plus float biases, norms and scales, a larger share in this small net.
    assert report.size_ratio <= 0.33
    assert report.int8_bytes == out.stat().st_size
    batch = crops[0][None]
    expected = cpu_session(fp32).run(None, {"input": batch})[0]
    quantized = cpu_session(out).run(None, {"input": batch})[0]
    relative = np.linalg.norm(quantized - expected) / np.linalg.norm(expected)
    assert 0 < relative < 0.1


def test_weight_quant_values_are_used_verbatim(unet_onnx, tmp_path):
    fp32, crops = unet_onnx
    float_graph = Graph(fp32)
    conv = float_graph.of_type("Conv")[1]
    deconv = float_graph.of_type("ConvTranspose")[0]
    rng = np.random.default_rng(5)
    given = {}
    for node, axis in ((conv, 0), (deconv, 1)):
        shape = tuple(float_graph.init[node.input[1]].dims)
        given[node.input[1]] = (rng.integers(-7, 8, size=shape).astype(np.int8),
                                rng.uniform(0.01, 0.1, size=shape[axis]).astype(np.float32))
    out = tmp_path / "given.onnx"
    report = quantize_onnx(fp32, out, crops, placement="tensorrt", weight_quant=given)
    graph = Graph(out)
    for node, axis in ((conv, 0), (deconv, 1)):
        # Given ConvTranspose scales stay on the output axis even for "tensorrt".
        q, scales = check_weight(graph, next(n for n in graph.nodes if n.name == node.name),
                                 given[node.input[1]][0].shape, axis)
        np.testing.assert_array_equal(q, given[node.input[1]][0])
        np.testing.assert_array_equal(scales, given[node.input[1]][1])
        assert report.weight_sources[node.input[1]] == "given"
    wrong = {conv.input[1]: (given[conv.input[1]][0], given[conv.input[1]][1][:-1])}
    with pytest.raises(PTQError, match="positive scales"):
        quantize_onnx(fp32, tmp_path / "wrong.onnx", crops, weight_quant=wrong)
    with pytest.raises(PTQError, match="not quantizable weight"):
        quantize_onnx(fp32, tmp_path / "wrong.onnx", crops, weight_quant={"nope": given[conv.input[1]]})
    assert not (tmp_path / "wrong.onnx").exists()


def test_keep_float_nodes_read_float(unet_onnx, tmp_path):
    fp32, crops = unet_onnx
    float_graph = Graph(fp32)
    kept = float_graph.of_type("Conv")[0]
    out = tmp_path / "mixed.onnx"
    report = quantize_onnx(fp32, out, crops, placement="cpu", keep_float={kept.name})
    graph = Graph(out)
    node = next(n for n in graph.nodes if n.name == kept.name)
    assert not any(graph.dequantized_from(name) for name in node.input)
    assert graph.init[node.input[1]].data_type == onnx.TensorProto.FLOAT
    assert report.kept_float == [kept.name]
    assert report.quantized_weights == len(float_graph.of_type("Conv", "ConvTranspose")) - 1
    with pytest.raises(PTQError, match="not nodes of the model"):
        quantize_onnx(fp32, tmp_path / "x.onnx", crops, keep_float={"no_such_node"})


def test_given_ranges_set_the_scales(unet_onnx, tmp_path):
    fp32, crops = unet_onnx
    first = quantize_onnx(fp32, tmp_path / "a.onnx", crops, placement="tensorrt")
    table = {name: 2.0 * amax for name, amax in first.activation_amax.items()}
    second = quantize_onnx(fp32, tmp_path / "b.onnx", table, placement="tensorrt")
    graph = Graph(tmp_path / "b.onnx")
    for name, amax in table.items():
        q = next(node for node in graph.readers[name] if node.op_type == "QuantizeLinear")
        assert graph.array(q.input[1]) == pytest.approx(amax / 127, rel=1e-6)
    assert second.method == "given"
    with pytest.raises(PTQError, match="range table lacks"):
        quantize_onnx(fp32, tmp_path / "c.onnx", {}, placement="tensorrt")
    with pytest.raises(PTQError, match="cpu, tensorrt"):
        quantize_onnx(fp32, tmp_path / "c.onnx", table, placement="gpu")


# ---- Linear layers and attention ------------------------------------------

class AttentionNet(torch.nn.Module):
    """Conv stem, self-attention over voxels, a squeeze-excitation Gemm, conv head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.qkv = torch.nn.Linear(8, 24)
        self.proj = torch.nn.Linear(8, 8)
        self.excite = torch.nn.Linear(8, 8)
        self.head = torch.nn.Conv3d(8, 2, 1)

    def forward(self, x):
        f = self.stem(x)
        tokens = f.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, dim=-1)
        f = f + self.proj(attention @ v).transpose(1, 2).reshape(f.shape)
        gate = torch.sigmoid(self.excite(f.mean(dim=(2, 3, 4))))
        return self.head(f * gate[:, :, None, None, None])


def test_linear_weights_quantized_attention_products_float(tmp_path):
    fp32 = export_onnx(AttentionNet(), tmp_path / "attn.onnx", 1, (1, 1, 4, 4, 4),
                       dynamic_spatial=False)
    crops = sample_crops([np.random.default_rng(0).normal(size=(1, 4, 4, 4)).astype(np.float32)],
                         (4, 4, 4), 2, seed=0)
    out = tmp_path / "attn.int8.onnx"
    report = quantize_onnx(fp32, out, crops, placement="cpu")
    graph, float_graph = Graph(out), Graph(fp32)
    weight_matmuls = [n for n in graph.of_type("MatMul") if graph.dequantized_from(n.input[1])]
    activation_matmuls = [n for n in graph.of_type("MatMul") if n not in weight_matmuls]
    assert len(weight_matmuls) == 2 and len(activation_matmuls) == 2
    for node in weight_matmuls:
        shape = tuple(float_graph.init[next(n for n in float_graph.nodes if n.name == node.name).input[1]].dims)
        check_weight(graph, node, shape, axis=len(shape) - 1)
        check_activation(graph, node.input[0])
    for node in activation_matmuls:  # q @ k^T and attention @ v
        assert not any(graph.dequantized_from(name) for name in node.input)
    gemm = graph.of_type("Gemm")[0]
    trans_b = next(a.i for a in gemm.attribute if a.name == "transB")
    float_gemm = next(n for n in float_graph.nodes if n.name == gemm.name)
    check_weight(graph, gemm, tuple(float_graph.init[float_gemm.input[1]].dims), 0 if trans_b else 1)
    assert report.quantized_ops["Gemm"] == 1 and report.float_ops["Softmax"] == 1
    batch = crops[0][None]
    expected = cpu_session(fp32).run(None, {"input": batch})[0]
    quantized = cpu_session(out).run(None, {"input": batch})[0]
    assert np.linalg.norm(quantized - expected) / np.linalg.norm(expected) < 0.1


# ---- the real shipped model on a real volume --------------------------------

@pytest.fixture(scope="module")
def real_int8(shipped_model_path, calibration_paths, evaluation_cases, tmp_path_factory):
    from SlicerPTQLib.preprocess import prepare
    from SlicerPTQLib.shipped import SHIPPED_SPEC
    from SlicerPTQLib.volumes import read_volume

    folder = tmp_path_factory.mktemp("deepbet")
    module = torch.jit.load(str(shipped_model_path)).eval()
    fp32 = export_onnx(module, folder / "bbox.fp32.onnx", 1, (1, 1, 128, 128, 128))
    images = [prepare(read_volume(path), SHIPPED_SPEC)[0] for path in calibration_paths[:2]]
    crops = sample_crops(images, SHIPPED_SPEC.roi_size, 2, seed=0)
    out = folder / "bbox.int8.onnx"
    report = quantize_onnx(fp32, out, crops, method="max", placement="cpu")
    name, image_path, _ = evaluation_cases[0]
    volume = prepare(read_volume(image_path), SHIPPED_SPEC)[0][None]
    return fp32, out, report, volume


def test_real_model_structure_and_size(real_int8):
    fp32, out, report, _ = real_int8
    float_graph, graph = Graph(fp32), Graph(out)
    weighted = float_graph.of_type("Conv", "ConvTranspose")
    assert len(weighted) == 35  # LinkNet3d: 29 Conv + 6 ConvTranspose
    for node in graph.of_type("Conv", "ConvTranspose"):
        shape = tuple(float_graph.init[next(n for n in weighted if n.name == node.name).input[1]].dims)
        check_weight(graph, node, shape, 0 if node.op_type == "Conv" else 1)
        check_conv_input(graph, node, shape, "cpu")
    stem = graph.of_type("Conv")[0]
    assert graph.dequantized_from(stem.input[0]) is None  # 1 channel: float input
    assert report.quantized_weights == 35
    assert report.size_ratio <= 0.3


def test_real_model_int8_agrees_with_fp32_on_a_real_volume(real_int8):
    fp32, out, _, volume = real_int8
    brain_fp32 = cpu_session(fp32).run(None, {"input": volume})[0][0, 1] > 0.5
    brain_int8 = cpu_session(out).run(None, {"input": volume})[0][0, 1] > 0.5
    assert brain_fp32.sum() > 100_000  # the network finds a brain at all
    dice = 2 * np.logical_and(brain_fp32, brain_int8).sum() / (brain_fp32.sum() + brain_int8.sum())
    assert dice >= 0.99
