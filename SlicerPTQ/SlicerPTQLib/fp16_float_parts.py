"""The float parts of a QDQ model in FP16, for INT8 TensorRT engines.

A TensorRT engine built from a QDQ ONNX file is strongly typed: every layer
runs in the type its ONNX tensors have. The Q/DQ-wrapped convolutions become
INT8 kernels, and everything else (norms, activations, Add, Concat, Resize,
the last Conv when it is left float) runs in the file's float type. NVIDIA's
Model-Optimizer converts those parts to FP16 after INT8 quantization
(``modelopt.onnx.quantization``: ``high_precision_dtype="fp16"`` by default,
done by AutoCast's ``convert_to_f16`` with the network I/O kept FP32); this
module is that pass for SlicerPTQ's QDQ files:

- float initializers and activations become float16, and so do the
  Q/DQ scales (``DequantizeLinear`` then outputs float16 straight into the
  FP16 layers, as ModelOpt writes it; FP16 scales need opset 19, so older
  files are converted to opset 19 first);
- the network input and output stay float32, with a ``Cast`` behind the
  input and before the output, so every engine is fed and read the same way;
- a scale below FP16's smallest normal number (6.1e-5, e.g. a weight
  channel of magnitude below 0.008) is raised to it, and the INT8 weights
  it dequantizes are requantized to the raised scale (error at most half
  of 6.1e-5); ModelOpt would store such a scale as an FP16 subnormal and
  lose its precision, and keeping the DQ in FP32 would put a Cast between
  it and its convolution, which TensorRT's INT8 fusion does not expect;
- the ops in :data:`KEEP_FLOAT32_OPS` stay FP32 (see there), as does a
  node with a float initializer beyond FP16's range (AutoCast's
  ``init_max`` rule), including a Q/DQ node whose scale is; a ``Cast``
  joins each FP32 island to its FP16 neighbours;
- Resize keeps its float32 ``scales`` input (the ONNX type of that input).

AutoCast's other default rule keeps a node in FP32 when a reference run
shows it handling values beyond 512 (``data_max``); that needs calibration
data at engine-build time, which the cache key cannot see, so the op list
below stands in for it on the layers where 3D networks reach such values.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .errors import PTQError

#: Float ops kept in FP32. Normalizations and reductions sum over a whole 3D
#: feature map (FP16 overflows or loses the variance), the same list as the
#: FP16 engine's so INT8 and FP16 engines compare like for like; Softmax,
#: LogSoftmax, Exp, Log, Pow grow or shrink values past FP16's range;
#: Upsample, NonMaxSuppression and Celu have no FP16 form (AutoCast's list).
KEEP_FLOAT32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "BatchNormalization",
                    "ReduceMean", "ReduceSum", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp",
                    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Upsample", "NonMaxSuppression", "Celu")
#: Changes whenever :func:`convert_float_parts` would write a different file.
RECIPE = "qdq-float-parts-fp16/io-fp32/opset19/v1"
MIN_OPSET = 19
FP16_MAX = float(np.finfo(np.float16).max)
FP16_SMALLEST_NORMAL = float(np.finfo(np.float16).tiny)

_FLOAT, _HALF = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16
_QDQ = ("QuantizeLinear", "DequantizeLinear")
# Inputs that take any type (no Cast needed) and inputs whose ONNX type is float32 whatever the data type.
_ANY_TYPE_INPUTS = {("Cast", 0), ("Shape", 0), ("Size", 0), ("Resize", 1)}
_FLOAT32_INPUTS = {("Resize", 2)}
# Ops whose float output type is an attribute: kept FP32, a Cast feeds their FP16 readers.
_ATTRIBUTE_TYPED_OPS = ("ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike",
                        "RandomUniformLike", "EyeLike")


@dataclass
class Conversion:
    """What :func:`convert_float_parts` did: node counts by precision, Casts added, what stayed FP32 and why."""

    fp16_nodes: int
    fp32_nodes: int
    casts_added: int
    opset: int
    kept_float32: Dict[str, str]
    raised_scales: Dict[str, int]

    def to_dict(self) -> Dict:
        return asdict(self)


def convert_float_parts(qdq_onnx: Path, out_path: Path,
                        keep_float32_ops: Sequence[str] = KEEP_FLOAT32_OPS) -> Conversion:
    """Write ``qdq_onnx`` with its float parts in FP16 to ``out_path`` (atomically); see the module docstring."""
    from .tensorrt_build import _load_onnx, _save_onnx_atomic

    qdq_onnx, out_path = Path(qdq_onnx), Path(out_path)
    model = _load_onnx(qdq_onnx, load_weights=True)
    if not any(node.op_type in _QDQ for node in model.graph.node):
        raise PTQError(f"{qdq_onnx} has no Q/DQ nodes; FP16 float parts are for INT8 (QDQ) models. Build an "
                       "fp16 engine from the float model instead.")
    converted, conversion = float_parts_model(model, keep_float32_ops, source=str(qdq_onnx))
    _save_onnx_atomic(converted, out_path)
    return conversion


def float_parts_model(model, keep_float32_ops: Sequence[str] = KEEP_FLOAT32_OPS, source: str = "the model"):
    """``(converted copy of model, Conversion)``; the in-memory form of :func:`convert_float_parts`."""
    import onnx

    for node in model.graph.node:
        if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for attribute in node.attribute):
            raise PTQError(f"{source} has control flow ({node.op_type} '{node.name}'), which the FP16 float-parts "
                           "pass does not convert; build the INT8 engine with float_parts='fp32'.")
    model = _at_least_opset(model, MIN_OPSET, source)
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    types = _tensor_types(model)
    initializers = {init.name: init for init in graph.initializer}
    raised = _raise_tiny_scales(graph, initializers)
    precision, kept = _classify(graph, types, initializers, set(keep_float32_ops))
    casts = _retype(graph, types, initializers, precision)
    # Types changed: drop the stale intermediate types and let ONNX infer them again, strictly.
    del graph.value_info[:]
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PTQError(f"The FP16 float-parts graph of {source} is not valid ONNX ({exc}); build the INT8 "
                       "engine with float_parts='fp32' and report the model.") from exc
    fp16 = sum(1 for value in precision.values() if value == _HALF)
    fp32 = sum(1 for value in precision.values() if value == _FLOAT)
    return model, Conversion(fp16_nodes=fp16, fp32_nodes=fp32, casts_added=casts,
                             opset=_default_opset(model), kept_float32=kept, raised_scales=raised)


def _raise_tiny_scales(graph, initializers) -> Dict[str, int]:
    """Raise Q/DQ scales below FP16's smallest normal to it; ``{scale name: values raised}``.

    A DequantizeLinear of constant INT8 weights gets those weights
    requantized to the raised scale (each tensor once), so it still
    dequantizes to the same values up to half the new step; activations
    are quantized and dequantized with the same raised scale.
    """
    from onnx import numpy_helper

    readers = defaultdict(list)
    for node in graph.node:
        if node.op_type in _QDQ and len(node.input) > 1 and node.input[1] in initializers:
            readers[node.input[1]].append(node)
    raised, requantized = {}, set()
    for name, nodes in readers.items():
        scale = numpy_helper.to_array(initializers[name])
        tiny = np.abs(scale) < FP16_SMALLEST_NORMAL
        if not tiny.any():
            continue
        new_scale = np.where(tiny, np.float32(FP16_SMALLEST_NORMAL), scale).astype(scale.dtype)
        for node in nodes:
            weight = node.input[0]
            if node.op_type == "DequantizeLinear" and weight in initializers and weight not in requantized:
                _requantize(node, initializers, scale, new_scale)
                requantized.add(weight)
        initializers[name].CopyFrom(numpy_helper.from_array(new_scale, name))
        raised[name] = int(tiny.sum())
    return raised


def _requantize(node, initializers, scale: np.ndarray, new_scale: np.ndarray) -> None:
    """Rewrite the integer input of DequantizeLinear ``node`` for ``new_scale`` (same real values, rounded)."""
    from onnx import numpy_helper

    weight = numpy_helper.to_array(initializers[node.input[0]])
    zero = (numpy_helper.to_array(initializers[node.input[2]]).astype(np.int64)
            if len(node.input) > 2 and node.input[2] in initializers else np.int64(0))
    ratio = (scale / new_scale).astype(np.float64)
    if ratio.ndim == 1 and ratio.size > 1:  # per channel along the node's axis (default 1)
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1) % weight.ndim
        shape = [1] * weight.ndim
        shape[axis] = ratio.size
        ratio, zero = ratio.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
    limits = np.iinfo(weight.dtype)
    values = np.round((weight.astype(np.int64) - zero) * ratio) + zero
    requantized = np.clip(values, limits.min, limits.max).astype(weight.dtype)
    initializers[node.input[0]].CopyFrom(numpy_helper.from_array(requantized, node.input[0]))


def _default_opset(model) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _at_least_opset(model, opset: int, source: str):
    """The model at ``opset`` or newer (FP16 Q/DQ scales are opset 19)."""
    from onnx import version_converter

    if _default_opset(model) >= opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++ adapters
        raise PTQError(f"Cannot convert {source} to ONNX opset {opset} for FP16 Q/DQ scales ({exc}); re-export "
                       f"the network with opset {opset} or build the INT8 engine with float_parts='fp32'.") from exc


def _tensor_types(model) -> Dict[str, int]:
    """``{tensor name: ONNX element type}`` for every typed tensor of the inferred graph."""
    graph = model.graph
    types = {init.name: init.data_type for init in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type"):
            types.setdefault(value.name, value.type.tensor_type.elem_type)
    return types


def _float_inputs(node, types: Dict[str, int]) -> List[Tuple[int, str]]:
    return [(index, name) for index, name in enumerate(node.input) if name and types.get(name) == _FLOAT]


def _is_float_node(node, types: Dict[str, int]) -> bool:
    if node.op_type == "Cast":
        return _cast_target(node) == _FLOAT
    return bool(_float_inputs(node, types)) or any(types.get(name) == _FLOAT for name in node.output)


def _cast_target(node) -> Optional[int]:
    return next((attribute.i for attribute in node.attribute if attribute.name == "to"), None)


def _constant_value(node) -> Optional[np.ndarray]:
    """The tensor of a Constant node given as ``value`` (None for the scalar/list forms)."""
    from onnx import numpy_helper

    tensor = next((attribute.t for attribute in node.attribute if attribute.name == "value"), None)
    return numpy_helper.to_array(tensor) if tensor is not None else None


def _wanted(node, position: int, node_precision: int) -> Optional[int]:
    """The type input ``position`` of ``node`` must have (None: any type)."""
    if (node.op_type, position) in _ANY_TYPE_INPUTS:
        return None
    return _FLOAT if (node.op_type, position) in _FLOAT32_INPUTS else node_precision


def _classify(graph, types, initializers, keep_ops: Set[str]) -> Tuple[Dict[int, int], Dict[str, str]]:
    """Per float node (by index) FP16 or FP32, and ``{node name: why}`` for those kept FP32."""
    from onnx import numpy_helper

    precision: Dict[int, int] = {}
    kept: Dict[str, str] = {}
    constants = []
    for index, node in enumerate(graph.node):
        if not _is_float_node(node, types):
            continue
        if node.op_type == "Constant":
            constants.append(index)
            continue
        reason = None
        float_initializers = [numpy_helper.to_array(initializers[name]) for _, name in _float_inputs(node, types)
                              if name in initializers]
        if node.op_type in keep_ops:
            reason = f"{node.op_type} is kept in FP32"
        elif node.op_type in _ATTRIBUTE_TYPED_OPS:
            reason = f"{node.op_type} takes its output type from an attribute"
        elif node.op_type in _QDQ:
            scale = node.input[1]
            if scale not in initializers:
                reason = "its scale is computed, not a constant"
            elif float(np.max(np.abs(numpy_helper.to_array(initializers[scale])))) > FP16_MAX:
                reason = "its scale exceeds FP16's range"
        elif any(array.size and float(np.max(np.abs(array))) > FP16_MAX for array in float_initializers):
            reason = "a weight exceeds FP16's range"
        precision[index] = _FLOAT if reason else _HALF
        if reason:
            kept[node.name or f"{node.op_type}#{index}"] = reason
    # A Constant takes the type its readers want, so Resize scales and the like are not rounded.
    readers = defaultdict(set)
    for index, node in enumerate(graph.node):
        for position, name in enumerate(node.input):
            if index in precision:
                wanted = _wanted(node, position, precision[index])
                if wanted is not None:
                    readers[name].add(wanted)
    for index in constants:
        node = graph.node[index]
        value = _constant_value(node)
        fits = value is not None and (not value.size or float(np.max(np.abs(value))) <= FP16_MAX)
        precision[index] = _HALF if fits and readers[node.output[0]] == {_HALF} else _FLOAT
    return precision, kept


def _retype(graph, types, initializers, precision: Dict[int, int]) -> int:
    """Rewrite tensor types and add Casts so every input has its reader's type; returns the Casts added."""
    from onnx import helper

    nodes = list(graph.node)
    produced = {value.name: _FLOAT for value in graph.input}
    for index, node in enumerate(nodes):
        for name in node.output:
            if types.get(name) == _FLOAT and index in precision:
                produced[name] = precision[index]

    # Graph outputs stay float32: an FP16 producer writes a renamed tensor that a Cast turns back.
    renames = {value.name: f"{value.name}__fp16" for value in graph.output if produced.get(value.name) == _HALF}
    for old, new in renames.items():
        produced[new], types[new] = _HALF, _FLOAT
    for node in nodes:
        for names in (node.input, node.output):
            for position, name in enumerate(names):
                if name in renames:
                    names[position] = renames[name]

    casts: Dict[Tuple[str, int], str] = {}
    demand: Dict[str, Dict[int, List[Tuple[object, int]]]] = defaultdict(lambda: defaultdict(list))
    ordered = []
    for index, node in enumerate(nodes):
        if index in precision:
            ordered.extend(_retype_node(node, precision[index], types, initializers, produced, casts, demand))
        ordered.append(node)
    for old, new in renames.items():
        ordered.append(helper.make_node("Cast", [new], [old], to=_FLOAT, name=f"{old}_to_fp32_Cast"))
    _retype_initializers(graph, initializers, demand)
    del graph.node[:]
    graph.node.extend(ordered)
    return len(casts) + len(renames)


def _retype_node(node, node_precision, types, initializers, produced, casts, demand) -> List:
    """Set ``node``'s float type; returns the Casts its inputs need (placed right before it)."""
    from onnx import helper, numpy_helper

    if node.op_type == "Cast":
        for attribute in node.attribute:
            if attribute.name == "to":
                attribute.i = node_precision
    if node.op_type == "Constant" and node_precision == _HALF:
        tensor = next(attribute.t for attribute in node.attribute if attribute.name == "value")
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    inserted = []
    for position, name in enumerate(node.input):
        wanted = _wanted(node, position, node_precision)
        if not name or types.get(name) != _FLOAT or wanted is None:
            continue
        if name in initializers:
            demand[name][wanted].append((node, position))
            continue
        if produced.get(name, _FLOAT) == wanted:
            continue
        if (name, wanted) not in casts:
            # The first reader of a tensor comes after its producer, so the Cast placed here is in order.
            casts[(name, wanted)] = f"{name}__to_{'fp16' if wanted == _HALF else 'fp32'}"
            inserted.append(helper.make_node("Cast", [name], [casts[(name, wanted)]], to=wanted,
                                             name=f"{casts[(name, wanted)]}_Cast"))
        node.input[position] = casts[(name, wanted)]
    return inserted


def _retype_initializers(graph, initializers, demand) -> None:
    """Float initializers become FP16 where only FP16 nodes read them; an FP16 copy when both kinds do."""
    from onnx import numpy_helper

    for name, by_type in demand.items():
        if _HALF not in by_type:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(initializers[name]).astype(np.float16))
        if _FLOAT not in by_type:
            half.name = name
            initializers[name].CopyFrom(half)
            continue
        half.name = f"{name}__fp16"
        graph.initializer.append(half)
        for node, position in by_type[_HALF]:
            node.input[position] = half.name
