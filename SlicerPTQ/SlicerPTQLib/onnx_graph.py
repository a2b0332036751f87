"""Small ONNX graph helpers shared by calibration and Q/DQ insertion."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .errors import PTQError


def load_model(path: Path):
    """Load an ONNX model (with external data), as PTQError when unreadable."""
    import onnx

    path = Path(path)
    try:
        return onnx.load(str(path))
    except Exception as exc:  # DecodeError, OSError, ...
        raise PTQError(f"Cannot read ONNX model {path}: {exc}. Check the path or "
                       "export the model again.") from exc


def image_input_name(model) -> str:
    """Name of the single non-initializer graph input."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    names = [value.name for value in model.graph.input if value.name not in initializers]
    if len(names) != 1:
        raise PTQError(f"The ONNX model has inputs {names}; exactly one image input is "
                       "supported. Re-export the network with a single input.")
    return names[0]


def consumers(graph) -> Dict[str, List]:
    """Tensor name -> nodes reading it (in graph order)."""
    readers: Dict[str, List] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                readers[name].append(node)
    return readers


def producers(graph) -> Dict[str, object]:
    """Tensor name -> the node writing it."""
    return {name: node for node in graph.node for name in node.output}


def constant_names(graph) -> set:
    """Names of every constant tensor (initializers and ``Constant`` outputs), no copies."""
    names = {tensor.name for tensor in graph.initializer}
    names |= {node.output[0] for node in graph.node if node.op_type == "Constant"}
    return names


def constant_arrays(graph) -> Dict[str, np.ndarray]:
    """Every constant tensor: initializers and ``Constant`` node outputs."""
    from onnx import numpy_helper

    arrays = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    arrays[node.output[0]] = numpy_helper.to_array(attribute.t)
    return arrays


def float_tensor_names(model) -> set:
    """Names of every float32 tensor whose type ONNX shape inference knows."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a help, not a must: fall back to declared types
        inferred = model
    graph = inferred.graph
    values = list(graph.value_info) + list(graph.input) + list(graph.output)
    return {value.name for value in values
            if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def with_extra_outputs(model, names: List[str]):
    """A copy of ``model`` that also outputs the tensors ``names`` (float)."""
    import onnx

    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {value.name for value in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return extended


def cpu_session(model_or_path, threads: Optional[int] = None, memory_arena: bool = True):
    """An ONNX Runtime CPU session on a model proto or file.

    ``memory_arena=False`` hands activation memory back after each run
    (calibration keeps its peak low between forwards).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = memory_arena
    if threads:
        options.intra_op_num_threads = threads
    if isinstance(model_or_path, (str, Path)):
        source = str(model_or_path)
    else:
        source = model_or_path.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
