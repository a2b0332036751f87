"""Find the weighted layers of an FP32 ONNX graph and simulate its activation Q/DQ.

Works on any exported network: every Conv, ConvTranspose, Gemm and MatMul
whose weight is a float32 initializer is a layer, in the graph's node
(execution) order. A BatchNormalization right after a Conv is folded
arithmetically: the layer's target becomes the BN output and its weights
are solved as ``gain[c] * W[c]``, which keeps them on a per-channel grid of
the original initializer (scale divided by ``gain``), so the ONNX file
itself need not change.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: Operators whose constant weights the low-bit solver quantizes.
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Layer:
    """One weighted layer as the solver sees it.

    ``output`` is the tensor the layer must reproduce (the BN output when
    a BatchNormalization was folded); ``gain`` (C_out,) multiplies the
    weights of each output channel and ``bias`` (C_out,) is the fixed
    float offset (the layer's bias, after BN folding), both in that
    tensor's terms. ``out_axis`` is the weight initializer's
    output-channel axis (0 for Conv, 1 for ConvTranspose and for Gemm
    without transB / MatMul); the per-channel scales run along it.
    """

    name: str
    node_name: str
    op_type: str
    weight: str
    input: str
    output: str
    weight_shape: Tuple[int, ...]
    out_axis: int
    gain: np.ndarray
    bias: Optional[np.ndarray]
    attributes: Dict[str, object] = field(default_factory=dict)
    folded: Optional[str] = None

    @property
    def out_channels(self) -> int:
        return int(self.weight_shape[self.out_axis]) * (self.groups if self.op_type == "ConvTranspose" else 1)

    @property
    def groups(self) -> int:
        return int(self.attributes.get("group", 1))


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or its first output when the exporter left it unnamed."""
    return node.name or node.output[0]


def _attributes(node: onnx.NodeProto) -> Dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _consumers(graph: onnx.GraphProto) -> Dict[str, List[int]]:
    consumers: Dict[str, List[int]] = defaultdict(list)
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name:
                consumers[name].append(index)
    return consumers


def find_layers(model: onnx.ModelProto) -> Tuple[List[Layer], List[str]]:
    """Weighted layers in execution order, and notes on the ones left to the INT8 writer."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    layers: List[Layer] = []
    notes: List[str] = []
    for node in graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        label = node_label(node)
        weight_name = node.input[1]
        if weight_name not in initializers or node.input[0] in initializers:
            continue
        weight = initializers[weight_name]
        if weight.data_type != onnx.TensorProto.FLOAT:
            notes.append(f"{label}: weight {weight_name} is not float32; left to the INT8 writer.")
            continue
        if len(consumers[weight_name]) > 1:
            notes.append(f"{label}: weight {weight_name} is shared by several nodes; left to the INT8 writer.")
            continue
        layer = _describe(node, list(weight.dims), initializers, notes)
        if layer is None:
            continue
        _fold_batchnorm(layer, graph, consumers, initializers, graph_outputs)
        layers.append(layer)
    return layers, notes


def _describe(node: onnx.NodeProto, shape: List[int], initializers: Dict[str, onnx.TensorProto],
              notes: List[str]) -> Optional[Layer]:
    label = node_label(node)
    attributes = _attributes(node)
    op = node.op_type
    bias = None
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if op in ("Conv", "ConvTranspose"):
        if len(shape) < 3:
            return None
        out_axis = 0 if op == "Conv" else 1
        out_channels = shape[out_axis] * (int(attributes.get("group", 1)) if op == "ConvTranspose" else 1)
        if bias_name is not None:
            if bias_name not in initializers:
                notes.append(f"{label}: bias {bias_name} is not a constant; left to the INT8 writer.")
                return None
            bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float64).reshape(-1)
    else:
        if len(shape) != 2:
            return None
        trans_b = int(attributes.get("transB", 0)) if op == "Gemm" else 0
        out_axis = 0 if trans_b else 1
        out_channels = shape[out_axis]
        if op == "Gemm" and bias_name is not None:
            if bias_name not in initializers:
                notes.append(f"{label}: Gemm bias {bias_name} is not a constant; left to the INT8 writer.")
                return None
            c = numpy_helper.to_array(initializers[bias_name]).astype(np.float64)
            if c.size not in (1, out_channels) or (c.ndim == 2 and c.shape[0] != 1):
                notes.append(f"{label}: Gemm bias of shape {c.shape} varies per row; left to the INT8 writer.")
                return None
            bias = float(attributes.get("beta", 1.0)) * np.broadcast_to(c.reshape(-1), (out_channels,)).copy()
    gain = np.ones(out_channels, dtype=np.float64)
    if op == "Gemm":
        gain *= float(attributes.get("alpha", 1.0))
    return Layer(name=label, node_name=node.name, op_type=op, weight=node.input[1], input=node.input[0],
                 output=node.output[0], weight_shape=tuple(int(s) for s in shape), out_axis=out_axis,
                 gain=gain, bias=bias, attributes=attributes)


def _fold_batchnorm(layer: Layer, graph: onnx.GraphProto, consumers: Dict[str, List[int]],
                    initializers: Dict[str, onnx.TensorProto], graph_outputs: Set[str]) -> None:
    """Retarget ``layer`` to a BatchNormalization that alone consumes its output."""
    users = consumers.get(layer.output, [])
    if layer.op_type not in ("Conv", "ConvTranspose") or len(users) != 1 or layer.output in graph_outputs:
        return
    bn = graph.node[users[0]]
    if bn.op_type != "BatchNormalization" or any(bn.output[1:]):  # training-mode BN has extra outputs
        return
    if not all(name in initializers for name in bn.input[1:5]):
        return
    scale, offset, mean, var = (numpy_helper.to_array(initializers[n]).astype(np.float64) for n in bn.input[1:5])
    epsilon = float(_attributes(bn).get("epsilon", 1e-5))
    gain = scale / np.sqrt(var + epsilon)
    bias = layer.bias if layer.bias is not None else np.zeros_like(gain)
    layer.gain = layer.gain * gain
    layer.bias = (bias - mean) * gain + offset
    layer.output = bn.output[0]
    layer.folded = node_label(bn)


def boundary_layers(model: onnx.ModelProto, layers: Sequence[Layer]) -> Set[str]:
    """Names of the first and last layers: those joined to a graph input or output by layer-free paths."""
    graph = model.graph
    by_input = defaultdict(list)
    by_output = {}
    weights = {layer.weight for layer in layers}
    layer_of = {layer.weight: layer for layer in layers}
    for node in graph.node:
        layer = layer_of.get(node.input[1]) if len(node.input) > 1 and node.input[1] in weights else None
        for name in node.input:
            by_input[name].append((node, layer))
        for name in node.output:
            by_output[name] = (node, layer)
    initializers = {t.name for t in graph.initializer}
    boundary: Set[str] = set()
    # Forward from the graph inputs: the first layer met on each path is a "first" layer.
    stack = [i.name for i in graph.input if i.name not in initializers]
    seen = set(stack)
    while stack:
        for node, layer in by_input.get(stack.pop(), []):
            if layer is not None:
                boundary.add(layer.name)
                continue
            for name in node.output:
                if name not in seen:
                    seen.add(name)
                    stack.append(name)
    # Backward from the graph outputs (through a folded BN too: it is not a layer).
    stack = [o.name for o in graph.output]
    seen = set(stack)
    while stack:
        producer = by_output.get(stack.pop())
        if producer is None:
            continue
        node, layer = producer
        if layer is not None:
            boundary.add(layer.name)
            continue
        for name in node.input:
            if name and name not in seen and name not in initializers:
                seen.add(name)
                stack.append(name)
    return boundary


@dataclass
class FakeQuant:
    """Where a simulated activation quantizer sits: its scale initializer and output."""

    tensor: str
    scale: str
    output: str


def insert_fake_quant(model: onnx.ModelProto, targets: Dict[str, Set[str]],
                      bits: int = 8) -> Tuple[onnx.ModelProto, Dict[str, FakeQuant]]:
    """A copy of ``model`` with symmetric per-tensor activation quantizers.

    ``targets`` maps a tensor to the labels (:func:`node_label`) of the
    nodes that should read its quantized copy. 8-bit uses QuantizeLinear /
    DequantizeLinear with int8 zero-point 0 (as the INT8 model does); other
    widths are simulated with Div/Round/Min/Max/Mul on the grid
    [-(2**(b-1)-1), 2**(b-1)-1]. Scales start at 1: set them (as
    ``amax / limit``) through the runner before running.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    limit = 2 ** (bits - 1) - 1
    quantizers: Dict[str, FakeQuant] = {}
    added_nodes: Dict[str, List[onnx.NodeProto]] = {}
    initializers = []
    for index, (tensor, readers) in enumerate(sorted(targets.items())):
        prefix = f"lowbit_act{index}"
        scale, output = f"{prefix}_scale", f"{prefix}_dq"
        initializers.append(numpy_helper.from_array(np.array(1.0, dtype=np.float32), scale))
        if bits == 8:
            zero = f"{prefix}_zero"
            initializers.append(numpy_helper.from_array(np.array(0, dtype=np.int8), zero))
            nodes = [helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{prefix}_q"], name=f"{prefix}_Q"),
                     helper.make_node("DequantizeLinear", [f"{prefix}_q", scale, zero], [output], name=f"{prefix}_DQ")]
        else:
            low, high = f"{prefix}_low", f"{prefix}_high"
            initializers += [numpy_helper.from_array(np.array(-limit, dtype=np.float32), low),
                             numpy_helper.from_array(np.array(limit, dtype=np.float32), high)]
            nodes = [helper.make_node("Div", [tensor, scale], [f"{prefix}_div"]),
                     helper.make_node("Round", [f"{prefix}_div"], [f"{prefix}_round"]),
                     helper.make_node("Min", [f"{prefix}_round", high], [f"{prefix}_min"]),
                     helper.make_node("Max", [f"{prefix}_min", low], [f"{prefix}_int"]),
                     helper.make_node("Mul", [f"{prefix}_int", scale], [output])]
        added_nodes[tensor] = nodes
        quantizers[tensor] = FakeQuant(tensor=tensor, scale=scale, output=output)
    rewired = []
    for node in graph.node:
        label = node_label(node)
        for position, name in enumerate(node.input):
            if name in quantizers and label in targets[name]:
                node.input[position] = quantizers[name].output
        rewired.append(node)
    # Keep topological order: quantizers of graph inputs first, others right after their producer.
    ordered = [n for tensor, nodes in added_nodes.items()
               if tensor not in {o for node in rewired for o in node.output} for n in nodes]
    for node in rewired:
        ordered.append(node)
        for name in node.output:
            ordered.extend(added_nodes.get(name, []))
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(initializers)
    return model, quantizers
