"""Q/DQ rules specific to TensorRT: its INT8 weight range and where it takes block-wise scales."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from SlicerPTQLib.qdq_check import ERROR, check_qdq


def _conv_model(weight: np.ndarray, scale: np.ndarray, block_size: int = 0) -> onnx.ModelProto:
    """input -> Q/DQ (per tensor) -> Conv whose weight is an int8 DequantizeLinear."""
    attributes = {"axis": 0}
    if block_size:
        attributes["block_size"] = block_size
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"], name="q_in"),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", **attributes),
        helper.make_node("Conv", ["x", "w"], ["output"], name="conv"),
    ]
    initializers = [numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z"),
                    numpy_helper.from_array(weight, "w_q"), numpy_helper.from_array(scale, "w_s")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 8, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_int8_weights_may_use_minus_128_for_tensorrt():
    weight = np.full((2, 4, 1, 1, 1), -128, np.int8)
    findings = check_qdq(_conv_model(weight, np.full(2, 0.01, np.float32)), target="tensorrt")
    assert not [finding for finding in findings if "-128" in finding.message or "127" in finding.message]


def test_block_wise_int8_weight_scales_are_refused_for_tensorrt():
    weight = np.ones((2, 4, 1, 1, 1), np.int8)
    blocked = np.full((1, 4, 1, 1, 1), 0.01, np.float32)  # blocks of 2 output channels
    findings = check_qdq(_conv_model(weight, blocked, block_size=2), target="tensorrt")
    assert [f.severity for f in findings if "block-wise scales on INT8 weights" in f.message] == [ERROR]
