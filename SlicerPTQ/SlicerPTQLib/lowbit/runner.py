"""Run an ONNX graph piece by piece, keeping only the tensors still needed.

The layer-wise solver asks for one tensor at a time (the input of the next
layer, its FP target), while the weights of earlier layers change between
requests. Each request runs only the nodes not executed yet that lead to
the wanted tensors, starting from cached tensors, so the whole solve costs
about one forward pass; a cached tensor is dropped once all its consumers
have run.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Set

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _subgraph_inputs(graph: onnx.GraphProto) -> Set[str]:
    """Outer-scope names a control-flow body reads (so its node depends on them)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: Set[str] = set()
    for node in graph.node:
        used.update(_node_inputs(node))
        defined.update(node.output)
    return used - defined


def _node_inputs(node: onnx.NodeProto) -> List[str]:
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            names.extend(_subgraph_inputs(attribute.g))
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for body in attribute.graphs:
                names.extend(_subgraph_inputs(body))
    return names


class IncrementalRunner:
    """Computes requested tensors of ``model`` with onnxruntime, caching the live frontier.

    ``feeds`` are the graph inputs. Initializers can be replaced with
    :meth:`set_initializer` as long as no node reading them has run.
    """

    def __init__(self, model: onnx.ModelProto, feeds: Dict[str, np.ndarray], threads: Optional[int] = None):
        self._model = model
        graph = model.graph
        self._nodes = list(graph.node)
        self._inputs = [_node_inputs(node) for node in self._nodes]
        self._initializers = {t.name: t for t in graph.initializer}
        self._overrides: Dict[str, np.ndarray] = {}
        self._producer = {name: index for index, node in enumerate(self._nodes) for name in node.output}
        self._consumers: Dict[str, List[int]] = defaultdict(list)
        for index, names in enumerate(self._inputs):
            for name in names:
                self._consumers[name].append(index)
        self._graph_outputs = {o.name for o in graph.output}
        self._cache: Dict[str, np.ndarray] = dict(feeds)
        self._executed: Set[int] = set()
        self._threads = threads

    def set_initializer(self, name: str, value: np.ndarray) -> None:
        """Replace initializer ``name`` for every node that has not run yet."""
        if name not in self._initializers:
            raise KeyError(f"{name} is not an initializer of the model")
        if any(index in self._executed for index in self._consumers.get(name, [])):
            raise RuntimeError(f"initializer {name} changed after a node reading it ran")
        self._overrides[name] = np.asarray(value)

    def compute(self, names: Iterable[str]) -> List[np.ndarray]:
        """The values of tensors ``names``, running whatever nodes they still need."""
        names = list(names)
        plan = self._plan([name for name in names if name not in self._cache])
        if plan:
            self._run(plan, names)
        values = [self._cache[name] for name in names]
        self._evict()
        return values

    def _plan(self, wanted: List[str]) -> List[int]:
        plan: Set[int] = set()
        stack = list(wanted)
        while stack:
            name = stack.pop()
            if name in self._cache or name in self._initializers:
                continue
            index = self._producer.get(name)
            if index is None:
                raise KeyError(f"tensor {name} is neither fed nor produced by the model")
            if index in self._executed:
                raise RuntimeError(f"tensor {name} was already computed and released")
            if index not in plan:
                plan.add(index)
                stack.extend(self._inputs[index])
        return sorted(plan)

    def _run(self, plan: List[int], wanted: List[str]) -> None:
        import onnxruntime as ort

        planned = set(plan)
        produced = {name for index in plan for name in self._nodes[index].output}
        read = {name for index in plan for name in self._inputs[index]}
        fed = sorted(name for name in read if name in self._cache and name not in produced)
        constants = sorted(name for name in read if name in self._initializers and name not in produced)
        # Keep whatever a node outside this plan will still read (the frontier).
        outputs = [name for name in sorted(produced) if name in wanted or name in self._graph_outputs
                   or any(c not in planned and c not in self._executed for c in self._consumers.get(name, []))]
        graph = helper.make_graph(
            [self._nodes[index] for index in plan], "lowbit_part",
            [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(self._cache[name].dtype),
                                           self._cache[name].shape) for name in fed],
            [helper.make_empty_tensor_value_info(name) for name in outputs],
            [self._initializer(name) for name in constants])
        part = helper.make_model(graph, opset_imports=self._model.opset_import, ir_version=self._model.ir_version)
        options = ort.SessionOptions()
        # Basic optimizations only: no fusion may change how the simulated Q/DQ rounds.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if self._threads:
            options.intra_op_num_threads = self._threads
        # Threads that sleep instead of spinning: the host is often shared with other work.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(part.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values = session.run(outputs, {name: self._cache[name] for name in fed})
        self._cache.update(zip(outputs, values))
        self._executed.update(plan)

    def _initializer(self, name: str) -> onnx.TensorProto:
        if name in self._overrides:
            return numpy_helper.from_array(self._overrides[name], name)
        return self._initializers[name]

    def _evict(self) -> None:
        for name in list(self._cache):
            if name in self._graph_outputs:
                continue
            if all(index in self._executed for index in self._consumers.get(name, [])):
                del self._cache[name]
