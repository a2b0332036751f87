"""Check a QDQ ONNX graph against the rules of the backend that will run it.

TensorRT builds INT8 kernels only from Q/DQ patterns it can fuse, and
reports nothing when a layer silently stays in float. This module reads the
graph on the CPU, before any engine is built, and lists what breaks the
documented rules:

- Q/DQ element types: signed INT8 (or FP8 E4M3, INT4 weights); no uint8,
  no INT32 bias dequantization (TensorRT's IDequantizeLayer takes
  INT8/FP8/INT4 only).
- Symmetric quantization: every zero point is 0.
- Activations per tensor (scalar scale); weights per tensor or per channel
  on the output-channel axis with one scale per channel: Conv axis 0,
  Gemm axis 0 (``transB=1``) or 1, MatMul the last axis of B.
- ConvTranspose weights: NVIDIA's kernels take per-input-channel scales
  (axis 0, what Model-Optimizer writes; TensorRT issues #1694, #2380), and
  NVIDIA states per-output-channel (axis 1, what onnxruntime writes) is not
  supported, so axis 1 is reported as a warning for TensorRT.
- Every QuantizeLinear feeds only DequantizeLinear nodes.
- Scales are positive and finite.
- A quantized ConvTranspose needs a Q on its output (directly or after one
  activation) to be fused into an INT8 kernel (TensorRT #1699, #2597,
  #3412); without it TensorRT runs it INT8-in/float-out or in float.

``target="openvino"`` applies the same graph rules with OpenVINO's
tolerances (uint8 and asymmetric zero points are accepted with a warning,
ConvTranspose weights belong on axis 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Union

import numpy as np

if TYPE_CHECKING:
    import onnx

from .errors import PTQError

TARGETS = ("tensorrt", "openvino")
ERROR = "error"
WARNING = "warning"

_QUANT_OPS = ("QuantizeLinear", "DequantizeLinear")
_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Pointwise ops TensorRT fuses between a ConvTranspose and the Q after it.
_FUSIBLE_ACTIVATIONS = ("Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Clip", "Elu", "Selu",
                        "HardSigmoid", "Softplus")

# ONNX TensorProto element types used by Q/DQ.
_INT8, _UINT8, _INT32, _INT4, _UINT4 = 3, 2, 6, 22, 21
_FP8_E4M3FN = 17
_TYPE_NAMES = {_INT8: "int8", _UINT8: "uint8", _INT32: "int32", _INT4: "int4", _UINT4: "uint4",
               _FP8_E4M3FN: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2",
               20: "float8e5m2fnuz", 1: "float32", 10: "float16", 16: "bfloat16"}


@dataclass(frozen=True)
class Finding:
    """One rule the graph breaks: ``severity`` is "error" or "warning"."""

    severity: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.node}: {self.message}"


def check_qdq(model_or_path: Union[str, Path, "onnx.ModelProto"], target: str = "tensorrt") -> List[Finding]:
    """List the rule violations of a QDQ ONNX model for ``target``.

    Errors make the backend fail or compute something else than the graph
    says; warnings make a layer miss its INT8 kernel. An empty list means
    the graph follows every rule checked here.
    """
    if target not in TARGETS:
        raise PTQError(f"Unknown Q/DQ check target '{target}'. Choose one of: {', '.join(TARGETS)}.")
    return _Checker(_load(model_or_path), target).run()


def assert_valid(model_or_path: Union[str, Path, "onnx.ModelProto"], target: str = "tensorrt") -> List[Finding]:
    """Raise PTQError listing every error; return the warnings otherwise."""
    findings = check_qdq(model_or_path, target)
    errors = [finding for finding in findings if finding.severity == ERROR]
    if errors:
        where = model_or_path if isinstance(model_or_path, (str, Path)) else "the model"
        listed = "\n  ".join(str(finding) for finding in errors)
        raise PTQError(f"{where} breaks {len(errors)} Q/DQ rule(s) of {target}; re-quantize it with "
                       f"placement='{target}' (symmetric int8, zero points 0, per-tensor activations):"
                       f"\n  {listed}")
    return [finding for finding in findings if finding.severity == WARNING]


def _load(model_or_path):
    import onnx
    from google.protobuf.message import DecodeError

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = Path(model_or_path)
    try:
        return onnx.load(str(path))
    except (OSError, ValueError, DecodeError) as exc:
        raise PTQError(f"Cannot read ONNX model {path}: {exc}. Give the path of a .onnx file.") from exc


class _Checker:
    """Walks one graph once; each ``_check_*`` method appends findings."""

    def __init__(self, model, target: str) -> None:
        self.target = target
        self.graph = model.graph
        self.opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
        self.findings: List[Finding] = []
        self.constants: Dict[str, "onnx.TensorProto"] = {init.name: init for init in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.output:
                value = next((attr.t for attr in node.attribute if attr.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = value
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: Dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {output.name for output in self.graph.output}

    def run(self) -> List[Finding]:
        quant_nodes = [node for node in self.graph.node if node.op_type in _QUANT_OPS]
        if not quant_nodes:
            self._add(ERROR, "graph", "no QuantizeLinear/DequantizeLinear node: this is a float model, "
                                      "not a QDQ model; quantize it first")
            return self.findings
        if self.opset < 13 and any(self._is_per_axis(node) for node in quant_nodes):
            self._add(ERROR, "graph", f"per-channel Q/DQ needs ONNX opset 13 or newer, the model has "
                                      f"opset {self.opset}; re-export with opset >= 13")
        for node in quant_nodes:
            self._check_quant_node(node)
            if node.op_type == "QuantizeLinear":
                self._check_followed_by_dequantize(node)
        for node in self.graph.node:
            if node.op_type in _COMPUTE_OPS:
                self._check_compute_node(node)
        return self.findings

    # -- helpers -----------------------------------------------------------
    def _add(self, severity: str, node, message: str) -> None:
        name = node if isinstance(node, str) else _node_name(node)
        self.findings.append(Finding(severity, name, message))

    def _for_tensorrt(self) -> bool:
        return self.target == "tensorrt"

    def _const(self, name: str) -> Optional[np.ndarray]:
        from onnx import numpy_helper

        tensor = self.constants.get(name)
        if tensor is None:
            return None
        return numpy_helper.to_array(tensor)

    def _elem_type_of_constant(self, name: str) -> Optional[int]:
        tensor = self.constants.get(name)
        return None if tensor is None else tensor.data_type

    def _attr(self, node, name: str, default):
        from onnx import helper

        for attr in node.attribute:
            if attr.name == name:
                return helper.get_attribute_value(attr)
        return default

    def _is_per_axis(self, node) -> bool:
        scale = self._const(node.input[1]) if len(node.input) > 1 else None
        return scale is not None and scale.size > 1

    def _quantized_type(self, node) -> Optional[int]:
        """ONNX element type of the quantized side of a Q or DQ node."""
        if len(node.input) > 2 and node.input[2]:
            zero_type = self._elem_type_of_constant(node.input[2])
            if zero_type is not None:
                return zero_type
        if node.op_type == "QuantizeLinear":
            output_dtype = self._attr(node, "output_dtype", 0)
            return output_dtype or _UINT8  # the ONNX default without a zero point is uint8
        source = node.input[0]
        if source in self.constants:
            return self._elem_type_of_constant(source)
        producer = self.producer.get(source)
        if producer is not None and producer.op_type == "QuantizeLinear":
            return self._quantized_type(producer)
        return None

    def _is_weight(self, node) -> bool:
        """Q/DQ of a constant tensor (weights) rather than of an activation."""
        return node.input[0] in self.constants

    # -- per Q/DQ node -----------------------------------------------------
    def _check_quant_node(self, node) -> None:
        if len(node.input) < 2 or not node.input[1]:
            self._add(ERROR, node, f"{node.op_type} has no scale input")
            return
        scale = self._const(node.input[1])
        if scale is None:
            self._add(ERROR, node, "scale is not a constant: calibrated scales must be initializers")
            return
        self._check_scale_values(node, scale)
        self._check_element_type(node)
        self._check_zero_point(node)
        if scale.ndim > 1:
            self._check_blocked(node)
        elif scale.size > 1:
            self._check_per_axis(node, scale)

    def _check_scale_values(self, node, scale: np.ndarray) -> None:
        values = scale.astype(np.float64)
        if not np.all(np.isfinite(values)):
            self._add(ERROR, node, "scale holds NaN or infinity")
        elif np.any(values <= 0):
            self._add(ERROR, node, f"scale must be positive, smallest value is {values.min():.3g}")

    def _check_element_type(self, node) -> None:
        elem = self._quantized_type(node)
        if elem is None:
            return
        name = _TYPE_NAMES.get(elem, str(elem))
        weight = self._is_weight(node)
        if elem == _INT8 or elem == _FP8_E4M3FN:
            return
        if elem in (_INT4, _UINT4) and weight:
            if self._for_tensorrt() and elem == _UINT4:
                self._add(ERROR, node, "uint4 weights: TensorRT takes signed INT4 weights only")
            return
        if elem == _UINT8:
            severity = ERROR if self._for_tensorrt() else WARNING
            reason = ("TensorRT supports signed INT8 Q/DQ only" if self._for_tensorrt() else
                      "OpenVINO runs ConvTranspose3d in f32 with uint8 activations")
            self._add(severity, node, f"quantized type is uint8 ({reason}); use int8 with zero point 0")
            return
        if elem == _INT32 and node.op_type == "DequantizeLinear":
            if self._for_tensorrt():
                self._add(ERROR, node, "int32 DequantizeLinear (a quantized bias): TensorRT dequantizes "
                                       "INT8/FP8/INT4 only; keep biases in float (onnxruntime: "
                                       "extra_options QuantizeBias=False)")
            return
        severity = ERROR if self._for_tensorrt() else WARNING
        self._add(severity, node, f"quantized type {name} is not supported by {self.target}; use int8")

    def _check_zero_point(self, node) -> None:
        if len(node.input) < 3 or not node.input[2]:
            return
        zero_point = self._const(node.input[2])
        if zero_point is None:
            self._add(ERROR, node, "zero point is not a constant")
            return
        if np.any(zero_point.astype(np.float64) != 0):
            severity = ERROR if self._for_tensorrt() else WARNING
            self._add(severity, node, "asymmetric quantization (non-zero zero point); "
                                      f"{self.target} needs symmetric Q/DQ with zero point 0")

    def _check_blocked(self, node) -> None:
        if not self._is_weight(node):
            self._add(ERROR, node, "block-wise scales on an activation: activations must be per tensor")
        elif self._for_tensorrt() and self._quantized_type(node) == _INT8:
            # TensorRT's block quantization is for INT4/FP4/FP8 weights only.
            self._add(ERROR, node, "block-wise scales on INT8 weights: TensorRT takes block-wise scales for "
                                   "INT4/FP4/FP8 only; quantize INT8 weights per output channel")

    def _check_per_axis(self, node, scale: np.ndarray) -> None:
        axis = int(self._attr(node, "axis", 1))
        if not self._is_weight(node):
            severity = ERROR if self._for_tensorrt() else WARNING
            self._add(severity, node, f"per-channel scales ({scale.size}) on an activation: "
                                      f"{self.target} quantizes activations per tensor (one scalar scale)")
            return
        weight = self._const(node.input[0])
        rank = weight.ndim
        if not -rank <= axis < rank:
            self._add(ERROR, node, f"axis {axis} is outside the rank-{rank} weight")
            return
        axis %= rank
        if weight.shape[axis] != scale.size:
            self._add(ERROR, node, f"{scale.size} scales for axis {axis} of a weight of shape "
                                   f"{list(weight.shape)}: need one scale per channel "
                                   f"({weight.shape[axis]})")
            return
        dq_output = self._dequantized_output(node)
        for consumer in self.consumers.get(dq_output, []):
            if consumer.op_type in _COMPUTE_OPS and len(consumer.input) > 1 and consumer.input[1] == dq_output:
                self._check_weight_axis(node, consumer, axis, rank)

    def _dequantized_output(self, node) -> str:
        """The float tensor a weight Q/DQ chain delivers to its consumers."""
        if node.op_type == "DequantizeLinear":
            return node.output[0]
        dequantize = next((c for c in self.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"),
                          None)
        return dequantize.output[0] if dequantize is not None else node.output[0]

    def _check_weight_axis(self, node, consumer, axis: int, rank: int) -> None:
        op = consumer.op_type
        consumer_name = _node_name(consumer)
        if op == "Conv" and axis != 0:
            self._add(ERROR, node, f"Conv weights of {consumer_name} are quantized on axis {axis}; "
                                   "per-channel Conv weights must use the output-channel axis 0")
        elif op == "ConvTranspose":
            if axis not in (0, 1):
                self._add(ERROR, node, f"ConvTranspose weights of {consumer_name} are quantized on axis "
                                       f"{axis}; use axis 0 or 1 (or one scale per tensor)")
            elif self._for_tensorrt() and axis == 1:
                self._add(WARNING, node, f"ConvTranspose weights of {consumer_name} use per-output-channel "
                                         "scales (axis 1); NVIDIA states TensorRT's deconvolution kernels "
                                         "take per-input-channel (axis 0) or per-tensor weight scales "
                                         "(TensorRT #2380), so this layer may not run INT8: check "
                                         "layer_precisions()")
            elif not self._for_tensorrt() and axis == 0:
                self._add(WARNING, node, f"ConvTranspose weights of {consumer_name} are quantized per input "
                                         "channel (axis 0); OpenVINO expects output channels (axis 1)")
        elif op == "MatMul" and axis != rank - 1:
            self._add(ERROR, node, f"MatMul weights of {consumer_name} are quantized on axis {axis}; "
                                   f"per-channel MatMul weights use the last axis ({rank - 1})")
        elif op == "Gemm":
            expected = 0 if self._attr(consumer, "transB", 0) else 1
            if axis != expected:
                self._add(ERROR, node, f"Gemm weights of {consumer_name} are quantized on axis {axis}; "
                                       f"with transB={1 - expected} the output axis is {expected}")

    # -- graph structure ---------------------------------------------------
    def _check_followed_by_dequantize(self, node) -> None:
        output = node.output[0]
        consumers = self.consumers.get(output, [])
        if output in self.graph_outputs:
            self._add(ERROR, node, "QuantizeLinear output is a graph output; it must feed a DequantizeLinear")
        if not consumers:
            if output not in self.graph_outputs:
                self._add(ERROR, node, "QuantizeLinear output is unused; every Q needs a DequantizeLinear")
            return
        others = sorted({c.op_type for c in consumers if c.op_type != "DequantizeLinear"})
        if others:
            self._add(ERROR, node, f"QuantizeLinear feeds {', '.join(others)} instead of DequantizeLinear; "
                                   "every Q must be followed by a DQ")
        for dequantize in consumers:
            if dequantize.op_type == "DequantizeLinear" and not self._same_parameters(node, dequantize):
                self._add(WARNING, dequantize, f"scale or zero point differs from its QuantizeLinear "
                                               f"{_node_name(node)}; a Q/DQ pair must share them")

    def _same_parameters(self, quantize, dequantize) -> bool:
        for index in (1, 2):
            q_name = quantize.input[index] if len(quantize.input) > index else ""
            dq_name = dequantize.input[index] if len(dequantize.input) > index else ""
            if q_name == dq_name:
                continue
            q_value = self._const(q_name) if q_name else None
            dq_value = self._const(dq_name) if dq_name else None
            if q_value is None or dq_value is None:
                if (q_value is None) != (dq_value is None) and not _all_zero(q_value, dq_value):
                    return False
                continue
            if q_value.shape != dq_value.shape or not np.array_equal(q_value, dq_value):
                return False
        return True

    def _check_compute_node(self, node) -> None:
        if len(node.input) < 2:
            return
        data_quantized = self._from_dequantize(node.input[0])
        weight_quantized = self._from_dequantize(node.input[1])
        if weight_quantized and not data_quantized:
            self._add(WARNING, node, f"{node.op_type} has quantized weights but a float input; without a "
                                     "Q/DQ on the input it runs in float")
        elif data_quantized and not weight_quantized and node.input[1] in self.constants:
            self._add(WARNING, node, f"{node.op_type} has a quantized input but float weights; add Q/DQ on "
                                     "the weights for an INT8 kernel")
        if (node.op_type == "ConvTranspose" and self._for_tensorrt() and data_quantized and weight_quantized
                and not self._output_quantized(node)):
            self._add(WARNING, node, "quantized ConvTranspose without a QuantizeLinear on its output (directly "
                                     "or after one activation): TensorRT fuses it into an INT8 kernel only "
                                     "with that Q (TensorRT #1699, #2597, #3412)")

    def _from_dequantize(self, tensor: str) -> bool:
        producer = self.producer.get(tensor)
        return producer is not None and producer.op_type == "DequantizeLinear"

    def _output_quantized(self, node) -> bool:
        frontier = list(self.consumers.get(node.output[0], []))
        if any(consumer.op_type == "QuantizeLinear" for consumer in frontier):
            return True
        for consumer in frontier:
            if consumer.op_type in _FUSIBLE_ACTIVATIONS:
                if any(c.op_type == "QuantizeLinear" for c in self.consumers.get(consumer.output[0], [])):
                    return True
        return False


def _node_name(node) -> str:
    """The node's name, or ``op_type(first output)`` for unnamed nodes."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def _all_zero(*values: Optional[np.ndarray]) -> bool:
    """True when every given zero point is absent or all zeros (they then agree)."""
    return all(value is None or not np.any(value.astype(np.float64)) for value in values)
