"""Explicit INT8 quantization of an FP32 ONNX graph (standard QDQ format).

The output is the file both OpenVINO (CPU) and TensorRT (NVIDIA) read as
an INT8 network:

- weights of Conv / ConvTranspose / Gemm / MatMul: symmetric INT8 per
  output channel, stored as int8 initializers feeding a
  ``DequantizeLinear`` (zero-point 0; Conv axis 0, ConvTranspose axis 1
  because its weight is ``(C_in, C_out/groups, k...)``, MatMul ``(K, N)``
  and Gemm ``(K, N)`` axis 1, Gemm with ``transB`` axis 0); the
  "tensorrt" placement gives ConvTranspose weights one scale per tensor
  instead: NVIDIA's answers (TensorRT #2380, #1694) say its INT8
  deconvolution takes per-input-channel scales (axis 0), NVIDIA's
  Model-Optimizer writes axis 1, and no GPU run here settled it yet; a
  per-tensor scale is correct under either reading (benchmarks/gpu_check.py
  tests all three). Biases stay float. No float copy of a
  quantized weight is kept, so the file is about 4x smaller;
- activations: one ``QuantizeLinear -> DequantizeLinear`` pair per chosen
  tensor, symmetric per tensor, int8 zero-point 0 (asymmetric uint8 made
  OpenVINO run ConvTranspose3d in FP32), shared by all its consumers.

Which tensors get a pair is a :class:`Placement` (data, per op type). Ops
in :data:`FLOAT_OPS` (softmax/sigmoid heads, layer norm, resize) and
MatMuls between two activations (attention scores and their weighted sum)
always read float, as do convolutions narrower than the placement's
``min_input_channels``; ``keep_float`` forces more nodes to float by name
(float inputs and float weights).
Pipeline: choose tensors for the placement -> collect their ranges on
calibration crops -> rewrite the graph -> write atomically.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import onnx_graph
from .atomic import replacing
from .calibration import collect_ranges
from .errors import PTQError
from .float_policy import float_policy_nodes
from .observers import INT8_MAX
from .progress import ProgressCallback

#: Ops whose inputs and outputs always stay float: saturating heads and
#: normalisations over a few values lose the most from an 8-bit grid, and
#: Resize gains nothing from it.
FLOAT_OPS: FrozenSet[str] = frozenset({
    "Softmax", "LogSoftmax", "Sigmoid", "LayerNormalization", "Resize", "Upsample",
})
#: Ops that read only a tensor's shape: they keep the float tensor.
SHAPE_OPS: FrozenSet[str] = frozenset({"Shape", "Size"})
#: Ops with a constant weight in input 1 that get per-channel INT8 weights.
WEIGHTED_OPS: FrozenSet[str] = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class Placement:
    """Where activation Q/DQ pairs go, by op type.

    ``input_ops``: ops whose float activation inputs are quantized (Add
    only when both inputs are activations, i.e. a residual; MatMul/Gemm
    only when the other input is a constant weight). ``output_ops``: ops
    whose float outputs are quantized. ``conv_transpose_axis``: the
    ConvTranspose weight axis that gets one scale per channel (None: one
    scale for the whole weight).
    ``min_input_channels``: a Conv/ConvTranspose with fewer input channels
    (per group) keeps a float input (its weights are still stored int8).
    """

    name: str
    input_ops: FrozenSet[str]
    output_ops: FrozenSet[str]
    conv_transpose_axis: Optional[int] = 1
    min_input_channels: int = 1
    description: str = ""


_COMPUTE_INPUTS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "MaxPool",
                             "AveragePool", "Add"})

PLACEMENTS: Dict[str, Placement] = {
    "cpu": Placement(
        name="cpu",
        input_ops=_COMPUTE_INPUTS | {"Concat"},
        output_ops=frozenset({"ConvTranspose", "InstanceNormalization", "BatchNormalization",
                              "GroupNormalization", "Relu", "LeakyRelu", "PRelu", "Elu",
                              "Clip", "Mul", "Add"}),
        min_input_channels=4,
        description="Dense placement for OpenVINO: also quantize the outputs of norms, "
                    "activations and Add and the inputs of Concat, so int8 flows from "
                    "layer to layer without float reorders. Convolutions over fewer than 4 "
                    "input channels (the stem of a single-modality network) read float: "
                    "OpenVINO's AMX INT8 kernel ran deepbet's 7^3 one-channel stem 2x "
                    "slower than FP32."),
    "tensorrt": Placement(
        name="tensorrt",
        input_ops=_COMPUTE_INPUTS,
        output_ops=frozenset({"ConvTranspose"}),
        conv_transpose_axis=None,
        description="Q/DQ on the activation inputs of Conv, ConvTranspose, MatMul, Gemm, "
                    "pooling and residual Add, and on ConvTranspose outputs so TensorRT "
                    "fuses them into INT8 deconvolutions; ConvTranspose weights per tensor, "
                    "correct whichever per-channel axis TensorRT's INT8 deconvolution "
                    "takes (axis 0 per NVIDIA/TensorRT #2380, #1694; axis 1 in "
                    "Model-Optimizer) until a GPU run settles it."),
}


@dataclass
class QuantizationReport:
    """What :func:`quantize_onnx` did."""

    placement: str
    method: str
    #: op type -> nodes reading INT8 (Q/DQ) activations or weights
    quantized_ops: Dict[str, int]
    #: op type -> nodes left entirely float (Constant nodes not counted)
    float_ops: Dict[str, int]
    #: nodes the caller forced to float
    kept_float: List[str]
    #: activation tensor -> clipping bound (scale = amax / 127)
    activation_amax: Dict[str, float]
    quantized_weights: int
    fp32_bytes: int
    int8_bytes: int
    output_path: str = ""
    #: weight initializer -> "rounded" (here) or "given" (``weight_quant``)
    weight_sources: Dict[str, str] = field(default_factory=dict)
    #: weight initializer -> axis of its per-channel scales
    weight_axes: Dict[str, Optional[int]] = field(default_factory=dict)  # None: one scale per tensor

    @property
    def size_ratio(self) -> float:
        """INT8 file size / FP32 file size."""
        return self.int8_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["size_ratio"] = self.size_ratio
        return data


#: ``{weight initializer: (int8 values, per-channel scales[, axis])}``.
WeightQuant = Mapping[str, Sequence]


def quantize_onnx(fp32_onnx: Path, out_path: Path,
                  calibration: Union[Sequence[np.ndarray], Mapping[str, float]],
                  method: str = "max", placement: str = "cpu",
                  weight_quant: Optional[WeightQuant] = None,
                  keep_float: Iterable[str] = frozenset(),
                  progress_callback: Optional[ProgressCallback] = None) -> QuantizationReport:
    """Write the QDQ INT8 version of ``fp32_onnx`` to ``out_path``.

    ``calibration``: crops ``(C, D, H, W)`` (ranges are collected with the
    ``method`` observer) or a ready ``{tensor name: amax}`` table.
    ``weight_quant``: ``{weight initializer: (int8 values with the weight's
    shape, per-channel scales[, axis])}`` used verbatim instead of rounding
    (e.g. from a low-bit solver); without an axis the scales run along the
    output-channel axis (ConvTranspose: 1, whatever the placement). ``keep_float``: node
    names that must read float inputs and keep float weights.
    """
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if placement not in PLACEMENTS:
        raise PTQError(f"Unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}.")
    model = _load_for_qdq(fp32_onnx)
    # The op-pattern float policy holds for every caller, not only the pipeline.
    keep_float = frozenset(keep_float) | frozenset(float_policy_nodes(fp32_onnx))
    _check_node_names(model.graph, keep_float)

    tensors = choose_activation_tensors(model, PLACEMENTS[placement], keep_float)
    weights = choose_weights(model, PLACEMENTS[placement], keep_float)
    if isinstance(calibration, Mapping):
        missing = [name for name in tensors if name not in calibration]
        if missing:
            raise PTQError(f"The range table lacks {len(missing)} tensor(s) the '{placement}' "
                           f"placement quantizes (e.g. {missing[:3]}); collect ranges for "
                           "all of them or pass calibration crops instead.")
        ranges = {name: float(calibration[name]) for name in tensors}
    else:
        ranges = collect_ranges(fp32_onnx, tensors, calibration, method, progress_callback)

    written = rewrite_graph(model, PLACEMENTS[placement], ranges, weights, keep_float,
                            dict(weight_quant or {}))
    quantized, floating = _count_ops(model.graph)
    _save_atomic(model, out_path)
    return QuantizationReport(
        placement=placement, method=method if not isinstance(calibration, Mapping) else "given",
        quantized_ops=quantized, float_ops=floating, kept_float=sorted(keep_float),
        activation_amax=ranges, quantized_weights=len(written),
        fp32_bytes=_file_bytes(fp32_onnx), int8_bytes=_file_bytes(out_path),
        output_path=str(out_path),
        weight_sources={name: source for name, (source, _) in written.items()},
        weight_axes={name: axis for name, (_, axis) in written.items()})


def _load_for_qdq(path: Path):
    """Load the model and make sure its opset has per-axis DequantizeLinear (13+)."""
    from onnx import version_converter

    model = onnx_graph.load_model(path)
    opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        try:
            model = version_converter.convert_version(model, 13)
        except Exception as exc:
            raise PTQError(f"{path} uses ONNX opset {opset}; per-channel INT8 needs opset 13 "
                           f"or newer and conversion failed ({exc}). Re-export the model "
                           "with opset 17.") from exc
    onnx_graph.image_input_name(model)
    return model


def _check_node_names(graph, names: FrozenSet[str]) -> None:
    known = {node.name for node in graph.node}
    unknown = sorted(names - known)
    if unknown:
        examples = [node.name for node in graph.node if node.op_type in WEIGHTED_OPS][:3]
        raise PTQError(f"keep_float names {unknown} are not nodes of the model; use ONNX node "
                       f"names such as {examples}.")


def _input_channels(node, weight_dims: Mapping[str, Sequence[int]]) -> Optional[int]:
    """Input channels per group of a Conv/ConvTranspose with a constant weight."""
    dims = weight_dims.get(node.input[1]) if len(node.input) > 1 else None
    if not dims or len(dims) < 3:
        return None
    if node.op_type == "Conv":
        return int(dims[1])  # (M, C/group, k...)
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return int(dims[0]) // max(1, group)  # (C, M/group, k...)


def _activation_inputs(node, constants: set, floats: set) -> List[str]:
    """The float, non-constant inputs of ``node`` that its placement rule quantizes."""
    live = [name for name in node.input if name and name not in constants and name in floats]
    op = node.op_type
    if op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
        return live[:1] if node.input[0] in live else []
    if op in ("MatMul", "Gemm"):
        # Only activation x constant weight: attention's activation x
        # activation products stay float.
        weight = node.input[1] if len(node.input) > 1 else ""
        return [node.input[0]] if weight in constants and node.input[0] in live else []
    if op == "Add":
        # A residual sum of two activations, not a bias or constant shift.
        return live if len(live) == 2 else []
    return live


def choose_activation_tensors(model, placement: Placement,
                              keep_float: FrozenSet[str] = frozenset()) -> List[str]:
    """Activation tensors that get a Q/DQ pair, in graph order."""
    graph = model.graph
    constants = onnx_graph.constant_names(graph)
    weight_dims = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    floats = onnx_graph.float_tensor_names(model)
    readers = onnx_graph.consumers(graph)
    graph_outputs = {value.name for value in graph.output}
    chosen: Dict[str, None] = {}
    input_name = onnx_graph.image_input_name(model)

    def reads_float(node) -> bool:
        return _reads_float(node, keep_float, placement, weight_dims)

    def float_readers_only(name: str) -> bool:
        return all(reads_float(reader) for reader in readers.get(name, []))

    for node in graph.node:
        if reads_float(node):
            continue
        if node.op_type in placement.input_ops:
            for name in _activation_inputs(node, constants, floats):
                chosen[name] = None
        if node.op_type in placement.output_ops:
            for name in node.output:
                # The network's own output and tensors only float heads read
                # stay float (no point quantizing logits before a softmax).
                if name in floats and name not in graph_outputs and not float_readers_only(name):
                    chosen[name] = None
    order = {input_name: -1}
    for position, node in enumerate(graph.node):
        for name in node.output:
            order[name] = position
    return sorted(chosen, key=lambda name: order.get(name, len(order)))


def quantized_readers(model, placement: Placement, tensors: Iterable[str],
                      keep_float: FrozenSet[str] = frozenset()) -> Dict[str, List[str]]:
    """Tensor -> names of the nodes that will read its Q/DQ copy (the others read float).

    The same rule :func:`rewrite_graph` applies, for callers that simulate
    the quantized graph (e.g. the low-bit solver).
    """
    graph = model.graph
    weight_dims = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    wanted = {name: [] for name in tensors}
    for node in graph.node:
        if _reads_float(node, keep_float, placement, weight_dims):
            continue
        for name in node.input:
            if name in wanted:
                wanted[name].append(node.name)
    return wanted


def _reads_float(node, keep_float: FrozenSet[str], placement: Placement,
                 weight_dims: Mapping[str, Sequence[int]]) -> bool:
    """True when ``node`` must see float activations (its weights may still be int8)."""
    if (node.op_type in FLOAT_OPS or node.op_type in SHAPE_OPS or node.name in keep_float
            or node.op_type in ("QuantizeLinear", "DequantizeLinear")):
        return True
    if node.op_type in ("Conv", "ConvTranspose"):
        channels = _input_channels(node, weight_dims)
        return channels is not None and channels < placement.min_input_channels
    return False


def weight_axis(node, weight: np.ndarray, conv_transpose_axis: Optional[int] = 1) -> Optional[int]:
    """The per-channel axis of ``node``'s weight (see module docstring); None: per tensor."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return conv_transpose_axis
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return weight.ndim - 1  # MatMul (..., K, N)


@dataclass(frozen=True)
class WeightSite:
    """A weight initializer to store as INT8.

    ``axis``: where rounded weights get their scales under the placement;
    ``output_axis``: the output-channel axis, the default axis of
    caller-supplied ``weight_quant`` scales (they differ only for
    ConvTranspose under the "tensorrt" placement).
    """

    op_type: str
    axis: Optional[int]
    output_axis: int


def choose_weights(model, placement: Placement,
                   keep_float: FrozenSet[str] = frozenset()) -> Dict[str, WeightSite]:
    """Float weight initializers of Conv/ConvTranspose/Gemm/MatMul to store as INT8.

    A weight shared by several nodes is quantized once; all of them must
    agree on the axis and none may be kept float.
    """
    import onnx

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers = onnx_graph.consumers(graph)
    chosen: Dict[str, WeightSite] = {}
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS or node.name in keep_float or len(node.input) < 2:
            continue
        name = node.input[1]
        tensor = initializers.get(name)
        if tensor is None or tensor.data_type != onnx.TensorProto.FLOAT or name in chosen:
            continue
        rank = len(tensor.dims)
        if rank < 2 or (node.op_type in ("Conv", "ConvTranspose") and rank < 3):
            continue
        shape_only = np.empty([0] * rank)
        axis = weight_axis(node, shape_only, placement.conv_transpose_axis)
        if any(reader.name in keep_float or reader.op_type != node.op_type
               or list(reader.input[1:2]) != [name]
               or weight_axis(reader, shape_only, placement.conv_transpose_axis) != axis
               for reader in readers[name]):
            continue
        chosen[name] = WeightSite(node.op_type, axis, weight_axis(node, shape_only))
    return chosen


def quantize_weight(weight: np.ndarray, axis: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel INT8: ``(q int8 like weight, scales (weight.shape[axis],))``.

    ``q`` lies in [-127, 127]; an all-zero channel gets scale 1. ``axis``
    None gives one scalar scale for the whole weight.
    """
    if axis is None:
        amax = float(np.abs(weight).max()) if weight.size else 0.0
        scale = (amax if amax > 0 else INT8_MAX) / INT8_MAX
        q = np.clip(np.round(weight / scale), -INT8_MAX, INT8_MAX)
        return q.astype(np.int8), np.array(scale, dtype=np.float32)
    moved = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
    amax = np.abs(moved).max(axis=1)
    scales = np.where(amax > 0, amax, INT8_MAX) / INT8_MAX
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scales.reshape(shape)), -INT8_MAX, INT8_MAX)
    return q.astype(np.int8), scales.astype(np.float32)


def _checked_weight_quant(name: str, weight: np.ndarray, site: WeightSite,
                          given: Sequence) -> Tuple[np.ndarray, np.ndarray, int]:
    """Validate one ``weight_quant`` entry ``(q, scales[, axis])``; return it with its axis."""
    if len(given) not in (2, 3):
        raise PTQError(f"weight_quant[{name!r}] must be (int8 values, scales) or "
                       "(int8 values, scales, axis).")
    axis = int(given[2]) if len(given) == 3 else site.output_axis
    if not 0 <= axis < weight.ndim:
        raise PTQError(f"weight_quant[{name!r}] axis {axis} is outside the weight's "
                       f"{weight.ndim} dims.")
    q, scales = np.asarray(given[0]), np.asarray(given[1], dtype=np.float32).reshape(-1)
    if q.shape != weight.shape:
        raise PTQError(f"weight_quant[{name!r}] has int8 values of shape {q.shape} but the "
                       f"weight is {weight.shape}.")
    if not np.issubdtype(q.dtype, np.integer) or q.min() < -128 or q.max() > 127:
        raise PTQError(f"weight_quant[{name!r}] values must be integers in [-128, 127].")
    if scales.shape != (weight.shape[axis],) or not np.all(np.isfinite(scales)) \
            or np.any(scales <= 0):
        raise PTQError(f"weight_quant[{name!r}] needs {weight.shape[axis]} positive scales "
                       f"(one per channel along axis {axis}), got shape {scales.shape}.")
    return q.astype(np.int8), scales, axis


def rewrite_graph(model, placement: Placement, ranges: Mapping[str, float],
                  weights: Mapping[str, WeightSite], keep_float: FrozenSet[str] = frozenset(),
                  weight_quant: Optional[WeightQuant] = None) -> Dict[str, Tuple[str, int]]:
    """Insert the Q/DQ pairs in place; return ``{weight: ("rounded" | "given", axis)}``."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    weight_quant = dict(weight_quant or {})
    unknown = sorted(set(weight_quant) - set(weights))
    if unknown:
        raise PTQError(f"weight_quant names {unknown} are not quantizable weight initializers "
                       f"of this model (those are e.g. {sorted(weights)[:3]}).")
    used = {name for node in graph.node for name in list(node.input) + list(node.output)}
    used |= {tensor.name for tensor in graph.initializer} | {node.name for node in graph.node}

    def fresh(base: str) -> str:
        name, counter = base, 1
        while name in used:
            name, counter = f"{base}_{counter}", counter + 1
        used.add(name)
        return name

    zero_point = fresh("ptq_int8_zero_point")
    # The shared activation zero point, only when some activation is quantized
    # (an unused initializer makes ONNX Runtime warn on every load).
    new_initializers = [numpy_helper.from_array(np.array(0, dtype=np.int8), zero_point)] if ranges else []
    dequantized: Dict[str, str] = {}   # original tensor -> its DequantizeLinear output
    front_nodes, pairs_after = [], {}

    sources: Dict[str, Tuple[str, int]] = {}
    float_weights = {tensor.name: tensor for tensor in graph.initializer if tensor.name in weights}
    for name, site in weights.items():
        weight = numpy_helper.to_array(float_weights[name])
        if name in weight_quant:
            q, scales, axis = _checked_weight_quant(name, weight, site, weight_quant[name])
            sources[name] = ("given", axis)
        else:
            axis = site.axis
            q, scales = quantize_weight(weight, axis)
            sources[name] = ("rounded", axis)
        q_name, scale_name = fresh(f"{name}_int8"), fresh(f"{name}_scale")
        zp_name, out_name = fresh(f"{name}_zero_point"), fresh(f"{name}_dequantized")
        new_initializers += [numpy_helper.from_array(q, q_name),
                             numpy_helper.from_array(scales, scale_name),
                             numpy_helper.from_array(np.zeros(scales.shape, np.int8), zp_name)]
        per_axis = {} if axis is None else {"axis": axis}
        front_nodes.append(helper.make_node("DequantizeLinear", [q_name, scale_name, zp_name],
                                            [out_name], name=fresh(f"{name}_DequantizeLinear"),
                                            **per_axis))
        dequantized[name] = out_name

    input_name = onnx_graph.image_input_name(model)
    for name, amax in ranges.items():
        scale_name = fresh(f"{name}_scale")
        # A tensor that was all zeros in calibration still needs a valid scale.
        scale = np.float32(max(float(amax), 1e-8) / INT8_MAX)
        new_initializers.append(numpy_helper.from_array(np.array(scale), scale_name))
        q_out, dq_out = fresh(f"{name}_quantized"), fresh(f"{name}_dequantized")
        pair = [helper.make_node("QuantizeLinear", [name, scale_name, zero_point], [q_out],
                                 name=fresh(f"{name}_QuantizeLinear")),
                helper.make_node("DequantizeLinear", [q_out, scale_name, zero_point], [dq_out],
                                 name=fresh(f"{name}_DequantizeLinear"))]
        if name == input_name:
            front_nodes += pair
        else:
            pairs_after[name] = pair
        dequantized[name] = dq_out

    weight_dims = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    nodes = list(front_nodes)
    for node in graph.node:
        float_activations = _reads_float(node, keep_float, placement, weight_dims)
        for index, name in enumerate(node.input):
            if name in dequantized and (name in weights or not float_activations):
                node.input[index] = dequantized[name]
        nodes.append(node)
        for name in node.output:
            nodes += pairs_after.get(name, [])
    del graph.node[:]
    graph.node.extend(nodes)

    still_read = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer
            if tensor.name not in weights or tensor.name in still_read]
    dropped = {tensor.name for tensor in graph.initializer} - {tensor.name for tensor in kept}
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    # Older exporters also list initializers as graph inputs.
    inputs = [value for value in graph.input if value.name not in dropped]
    del graph.input[:]
    graph.input.extend(inputs)
    # Stale shape annotations of rewired tensors are harmless but drop them
    # so tools re-infer from the new graph.
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return sources


def _count_ops(graph) -> Tuple[Dict[str, int], Dict[str, int]]:
    dq_outputs = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    quantized, floating = Counter(), Counter()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        if any(name in dq_outputs for name in node.input):
            quantized[node.op_type] += 1
        else:
            floating[node.op_type] += 1
    return dict(quantized), dict(floating)


def _save_atomic(model, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replacing(path, suffix=".onnx") as tmp:
            onnx.save(model, str(tmp))
    except ValueError as exc:  # e.g. a protobuf over 2 GB
        raise PTQError(f"Cannot write the INT8 model to {path}: {exc}.") from exc


def _file_bytes(path: Path) -> int:
    return Path(path).stat().st_size
