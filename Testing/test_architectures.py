"""Every registry architecture: small config -> FP32 ONNX -> QDQ INT8 -> OpenVINO INT8 on the CPU.

Random weights (the agreement of trained networks is measured by
benchmarks/bench_architectures.py); 32^3 patches and 3 classes keep each
case a few seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from SlicerPTQLib import architectures, onnx_graph
from SlicerPTQLib.errors import PTQError

ROI = (32, 32, 32)
CLASSES = 3
MEDPTQ_NETWORKS = ("UNet", "TransUNet", "UNesT", "nnU-Net", "SwinUNETR", "SegResNet", "VISTA3D")
SLOW = {"SwinUNETR", "SwinUNETRv2", "UNesT", "BasicUNet", "SegResNetDS"}  # > 20 s each here


def _cases():
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
            for name in architectures.REGISTRY]


def test_registry_covers_the_papers_networks():
    for name in MEDPTQ_NETWORKS:
        assert architectures.get(name).name in architectures.REGISTRY
    for name in ("BasicUNet", "SegResNetDS", "DynUNet", "UNETR", "SwinUNETRv2"):
        assert name in architectures.REGISTRY
    assert architectures.get("nnU-Net").name == "DynUNet"


def test_unknown_architecture_and_bad_roi_raise_ptqerror():
    with pytest.raises(PTQError, match="Unknown architecture"):
        architectures.get("NoSuchNet")
    with pytest.raises(PTQError, match="multiples of 32, each at least 64"):
        architectures.config_args("SwinUNETR", roi=(48, 48, 48))
    with pytest.raises(PTQError, match="Bad arguments for UNet"):
        architectures.build("UNet", {"spatial_dims": 3, "in_channels": 1})


def test_fixed_size_networks_get_the_roi_as_img_size():
    args = architectures.config_args("TransUNet", roi=(32, 48, 64), out_channels=4)
    assert args["img_size"] == (32, 48, 64) and args["out_channels"] == 4
    assert architectures.config_args("VISTA3D", out_channels=4)["class_ids"] == [0, 1, 2, 3]
    spec = architectures.spec_for("SwinUNETR", architectures.config_args("SwinUNETR"), (64, 64, 64))
    assert spec.dynamic_spatial is False and spec.roi_size == (64, 64, 64)


@pytest.mark.parametrize("name", _cases())
def test_small_config_exports_and_runs_int8_on_the_cpu(name, tmp_path):
    import torch

    from SlicerPTQLib.export import export_onnx, onnx_input_spec
    from SlicerPTQLib.qdq import quantize_onnx
    from SlicerPTQLib.runtimes import create_runtime
    from SlicerPTQLib.float_policy import float_policy_nodes

    entry = architectures.get(name)
    roi = tuple(max(size, entry.min_size) for size in ROI)
    torch.manual_seed(0)
    module = architectures.build(name, architectures.config_args(name, "small", out_channels=CLASSES, roi=roi))
    fp32 = export_onnx(module, tmp_path / "m.fp32.onnx", 1, (1, 1, *roi), dynamic_spatial=entry.dynamic_spatial)
    assert onnx_input_spec(fp32).dynamic_spatial == entry.dynamic_spatial

    rng = np.random.default_rng(0)
    crops = [rng.standard_normal((1, *roi)).astype(np.float32) for _ in range(2)]
    report = quantize_onnx(fp32, tmp_path / "m.int8.onnx", crops, keep_float=float_policy_nodes(fp32))
    assert report.quantized_weights > 0
    assert report.int8_bytes < 0.5 * report.fp32_bytes  # int8 weights, no constant-folded masks

    batch = crops[0][None]
    reference = create_runtime(fp32, "openvino", precision="fp32", threads=2).predict(batch)
    runtime = create_runtime(tmp_path / "m.int8.onnx", "openvino", threads=2)
    output = runtime.predict(batch)
    assert output.shape == (1, CLASSES, *roi) and np.all(np.isfinite(output))
    executed = [layer for layer in runtime.layer_precisions()
                if layer["type"] in ("Convolution", "Deconvolution", "MatMul", "FullyConnected")]
    assert any(layer["precision"] in ("int8", "uint8") for layer in executed), "no compute layer ran in INT8"
    correlation = np.corrcoef(reference.ravel(), output.ravel())[0, 1]
    assert correlation > 0.9, f"INT8 output correlates {correlation:.3f} with FP32"


def test_transformer_policy_quantizes_linears_keeps_norms_and_softmax_float(tmp_path):
    """Linear layers (MatMul with a constant weight) get INT8 weights and inputs;
    LayerNorm, Softmax and, with attention_score_nodes kept float, the attention
    score path (q.k^T, softmax.v) read float tensors only."""
    import torch

    from SlicerPTQLib.export import export_onnx
    from SlicerPTQLib.qdq import quantize_onnx
    from SlicerPTQLib.float_policy import attention_score_nodes

    torch.manual_seed(0)
    module = architectures.build("TransUNet", architectures.config_args("TransUNet", roi=ROI))
    fp32 = export_onnx(module, tmp_path / "t.fp32.onnx", 1, (1, 1, *ROI), dynamic_spatial=False)
    crops = [np.random.default_rng(1).standard_normal((1, *ROI)).astype(np.float32)]
    score_nodes = attention_score_nodes(fp32)
    quantize_onnx(fp32, tmp_path / "t.int8.onnx", crops, keep_float=score_nodes)
    graph = onnx_graph.load_model(tmp_path / "t.int8.onnx").graph
    producers = onnx_graph.producers(graph)
    constants = onnx_graph.constant_arrays(graph)

    def from_int8_weight(name):
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear" and node.input[0] in constants \
            and constants[node.input[0]].dtype == np.int8

    def from_dequantize(name):
        return name in producers and producers[name].op_type == "DequantizeLinear"

    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    linear = [node for node in matmuls if from_int8_weight(node.input[1])]
    attention = [node for node in matmuls if node not in linear]
    assert len(linear) == 2 * 4  # per layer: qkv, proj, two MLP linears
    assert len(attention) == 2 * 2  # per layer: scores and weighted sum
    assert all(from_dequantize(node.input[0]) for node in linear)
    assert sorted(node.name for node in attention) == sorted(score_nodes)
    assert not any(from_dequantize(name) for node in attention for name in node.input)
    for node in graph.node:
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert not any(from_dequantize(name) for name in node.input), node.name
