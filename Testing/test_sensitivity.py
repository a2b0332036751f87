"""Sensitivity-based mixed precision: per-layer errors, the fallback search, the budget."""

from __future__ import annotations

import numpy as np
import pytest

from SlicerPTQLib import architectures
from SlicerPTQLib.errors import PTQError
from SlicerPTQLib.float_policy import attention_score_nodes
from SlicerPTQLib.sensitivity import (Budget, OutputError, _smallest_passing, mixed_precision, output_error,
                                      quantized_nodes)

ROI = (32, 32, 32)


@pytest.fixture(scope="module")
def small_unet(tmp_path_factory):
    """A small MONAI UNet (random weights) exported to FP32 ONNX, with calibration crops."""
    import torch

    from SlicerPTQLib.export import export_onnx

    torch.manual_seed(0)
    module = architectures.build("UNet", architectures.config_args("UNet", out_channels=3, roi=ROI))
    path = export_onnx(module, tmp_path_factory.mktemp("unet") / "unet.fp32.onnx", 1, (1, 1, *ROI))
    rng = np.random.default_rng(0)
    crops = [rng.standard_normal((1, *ROI)).astype(np.float32) for _ in range(2)]
    return path, crops


def test_budget_rejects_unknown_metric_and_bad_thresholds():
    with pytest.raises(PTQError, match="Unknown accuracy metric"):
        Budget("psnr", 30)
    with pytest.raises(PTQError, match="Dice budget"):
        Budget("dice", 1.5)
    assert Budget("mse", 0.01).met(OutputError(relative_mse=0.005, dice=0.1))
    assert not Budget("dice", 0.99).met(OutputError(relative_mse=0.0, dice=0.98))


def test_output_error_of_identical_and_swapped_outputs():
    reference = [np.stack([np.ones((1, 4, 4, 4)), np.zeros((1, 4, 4, 4))], axis=1).astype(np.float32)]
    same = output_error(reference, reference)
    assert same.relative_mse == 0.0 and same.dice == 1.0
    swapped = output_error(reference, [reference[0][:, ::-1]])
    assert swapped.relative_mse == pytest.approx(2.0) and swapped.dice == 0.0


def test_search_finds_the_smallest_passing_count():
    # Error falls as more layers stay float; the budget is met from 5 layers on.
    errors = {count: OutputError(relative_mse=1.0 / (count + 1), dice=0.9 + 0.02 * count) for count in range(12)}
    calls = []

    def error_with(count):
        calls.append(count)
        return errors[count]

    assert _smallest_passing(Budget("dice", 0.99), error_with, 10) == 5
    assert len(set(calls)) <= 7  # about 2 log2(10), not 10
    assert _smallest_passing(Budget("dice", 0.5), error_with, 10) == 0
    assert _smallest_passing(Budget("mse", 0.0), error_with, 10) is None


def test_fallback_keeps_the_worst_layers_float_until_the_budget_is_met(small_unet, tmp_path):
    fp32, crops = small_unet
    full = mixed_precision(fp32, tmp_path / "full.onnx", crops, Budget("mse", 1.0), threads=2)
    assert full.met and full.fallback == [] and full.layers == []  # INT8 is within a loose budget
    assert full.policy_float == []  # a CNN has no attention scores or constant subgraphs

    threshold = full.full_int8.relative_mse / 4
    result = mixed_precision(fp32, tmp_path / "mixed.onnx", crops, Budget("mse", threshold), threads=2)
    assert result.met
    assert result.final.relative_mse <= threshold < result.full_int8.relative_mse
    errors = [layer.relative_mse for layer in result.layers]
    assert errors == sorted(errors, reverse=True)  # worst first
    kept_layers = [layer for layer in result.layers if layer.name in result.fallback]
    assert 0 < len(kept_layers) < len(result.layers)
    assert kept_layers == result.layers[:len(kept_layers)]
    assert result.fallback == [node for layer in kept_layers for node in layer.nodes]
    still_int8 = {name for name, _ in quantized_nodes(tmp_path / "mixed.onnx")}
    assert still_int8 and not still_int8 & set(result.fallback)
    assert result.evaluations < len(result.layers) + 2 * np.log2(len(result.layers)) + 4
    chosen = len(kept_layers)
    assert result.trials[0] == result.full_int8 and result.trials[chosen] == result.final
    assert all(Budget("mse", threshold).met(error) == (count >= chosen) for count, error in result.trials.items())


def test_attention_score_nodes_cover_scores_not_linears(tmp_path):
    import torch

    from SlicerPTQLib.export import export_onnx
    from SlicerPTQLib import onnx_graph

    torch.manual_seed(0)
    module = architectures.build("TransUNet", architectures.config_args("TransUNet", roi=ROI))
    fp32 = export_onnx(module, tmp_path / "t.onnx", 1, (1, 1, *ROI), dynamic_spatial=False)
    names = set(attention_score_nodes(fp32))
    graph = onnx_graph.load_model(fp32).graph
    constants = onnx_graph.constant_arrays(graph)
    for node in graph.node:
        if node.op_type == "MatMul":
            assert (node.name in names) == (node.input[1] not in constants), node.name
    unet = tmp_path / "u.onnx"
    export_onnx(architectures.build("UNet"), unet, 1, (1, 1, *ROI))
    assert attention_score_nodes(unet) == []


def test_input_independent_nodes_are_vista3d_class_embeddings(tmp_path):
    import torch

    from SlicerPTQLib.export import export_onnx
    from SlicerPTQLib.float_policy import float_policy_nodes, input_independent_nodes

    torch.manual_seed(0)
    module = architectures.build("VISTA3D", architectures.config_args("VISTA3D", roi=ROI))
    fp32 = export_onnx(module, tmp_path / "v.onnx", 1, (1, 1, *ROI))
    constant = input_independent_nodes(fp32)
    assert any("class_head/mlp" in name for name in constant)
    assert not any("encoder" in name for name in constant)
    assert set(constant) <= set(float_policy_nodes(fp32))


def test_budget_checked_on_whole_volumes_by_sliding_window(small_unet, tmp_path):
    fp32, crops = small_unet
    volumes = [np.random.default_rng(1).standard_normal((1, 40, 36, 44)).astype(np.float32)]
    loose = mixed_precision(fp32, tmp_path / "loose.onnx", crops, Budget("dice", 0.01), volumes=volumes, roi=ROI)
    assert loose.checked_on == "volumes" and loose.met and loose.fallback == []
    threshold = min(1.0, loose.full_int8.dice + 0.5 * (1 - loose.full_int8.dice))
    tight = mixed_precision(fp32, tmp_path / "tight.onnx", crops, Budget("dice", threshold), volumes=volumes,
                            roi=ROI)
    assert tight.met and tight.final.dice >= threshold and tight.fallback
    assert tight.full_int8 == loose.full_int8  # the same volumes, the same fully quantized model
    with pytest.raises(PTQError, match="roi"):
        mixed_precision(fp32, tmp_path / "x.onnx", crops, volumes=volumes)


def test_glue_nodes_that_quantize_only_together_are_one_layer(tmp_path):
    """VISTA3D's class head: the LeakyReLU output is Q/DQ'd only for the Reshape reading it, so the two
    are one layer; measured apart, each alone changed nothing although the pair cost agreement."""
    import torch

    from SlicerPTQLib import onnx_graph
    from SlicerPTQLib.export import export_onnx
    from SlicerPTQLib.float_policy import float_policy_nodes
    from SlicerPTQLib.qdq import quantize_onnx
    from SlicerPTQLib.sensitivity import _Evaluator, layer_groups

    torch.manual_seed(0)
    module = architectures.build("VISTA3D", architectures.config_args("VISTA3D", roi=ROI))
    fp32 = export_onnx(module, tmp_path / "v.onnx", 1, (1, 1, *ROI))
    rng = np.random.default_rng(0)
    crops = [rng.standard_normal((1, *ROI)).astype(np.float32) for _ in range(2)]
    policy = frozenset(float_policy_nodes(fp32))
    full = tmp_path / "full.onnx"
    quantize_onnx(fp32, full, crops, keep_float=policy)
    groups = layer_groups(fp32, quantized_nodes(full))
    tail = [members for _, members in groups.values() if any(name.endswith("class_head/Reshape") for name in members)]
    assert len(tail) == 1 and any(name.endswith("LeakyRelu") for name in tail[0])
    every_node = [node.name for node in onnx_graph.load_model(fp32).graph.node]
    alone = policy | frozenset(name for name in every_node if name not in tail[0])
    error = _Evaluator(fp32, crops, "onnxruntime", None, tmp_path).error(
        lambda path: quantize_onnx(fp32, path, crops, keep_float=alone))
    assert error.relative_mse > 0
