"""Nodes that stay float in every quantized model, by op pattern (any architecture).

Attention-score paths (q.k^T -> scale/bias/mask -> Softmax, and softmax.v)
and branches that do not depend on the image input (e.g. VISTA3D's class
embedding) are kept float: INT8 there costs accuracy, gains little, and
made OpenVINO fail to compile SwinUNETR and VISTA3D.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List


#: Ops an attention-score tensor passes through between the q.k^T product
#: and its Softmax (scaling, bias and mask addition, window reshapes).
_SCORE_PATH_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Reshape", "Transpose", "Unsqueeze", "Squeeze",
                             "Where", "Cast", "Expand"})


def attention_score_nodes(fp32_onnx: Path) -> List[str]:
    """Names of the attention-score nodes of a transformer graph, to keep in float.

    These are the MatMul/Einsum nodes that multiply two activations (q.k^T
    and softmax.v) and every node from a q.k^T product to its Softmax
    (scale, relative-position bias and shift-mask Adds, window reshapes).
    INT8 on this path costs accuracy and gains little; an Add of two
    quantized score tensors also makes OpenVINO's low-precision pass fail
    to compile SwinUNETR. Empty for CNNs.
    """
    from . import onnx_graph

    graph = onnx_graph.load_model(fp32_onnx).graph
    constants = onnx_graph.constant_arrays(graph)
    readers = onnx_graph.consumers(graph)
    chosen: Dict[str, None] = {}
    products = [node for node in graph.node if node.op_type in ("MatMul", "Einsum")
                and len(node.input) > 1 and not any(name in constants for name in node.input)]
    for product in products:
        chosen[product.name] = None
        frontier, path = list(product.output), []
        for _ in range(8):  # the score path is short; stop rather than wander through the graph
            next_nodes = [reader for name in frontier for reader in readers.get(name, [])]
            if not next_nodes or any(node.op_type == "Softmax" for node in next_nodes):
                if next_nodes:
                    chosen.update((node.name, None) for node in path)
                break
            if not all(node.op_type in _SCORE_PATH_OPS for node in next_nodes):
                break
            path += next_nodes
            frontier = [name for node in next_nodes for name in node.output]
    return [name for name in chosen if name]


def input_independent_nodes(fp32_onnx: Path) -> List[str]:
    """Names of nodes whose result does not depend on the image input.

    Such a subgraph (VISTA3D's class-embedding MLP) is a constant that
    runtimes fold at load time: INT8 there buys nothing, and a Q/DQ pair
    inside it made OpenVINO 2026.4 fail to compile ("empty child edge").
    """
    from . import onnx_graph

    model = onnx_graph.load_model(fp32_onnx)
    live = {onnx_graph.image_input_name(model)}
    independent = []
    for node in model.graph.node:
        if any(name in live for name in node.input):
            live.update(node.output)
        elif node.name and node.op_type not in ("Constant", "Identity"):  # no compute to keep float
            independent.append(node.name)
    return independent


def float_policy_nodes(fp32_onnx: Path) -> List[str]:
    """Nodes kept float whatever the sensitivity says: attention scores and input-independent nodes."""
    names = attention_score_nodes(fp32_onnx) + input_independent_nodes(fp32_onnx)
    return list(dict.fromkeys(names))
