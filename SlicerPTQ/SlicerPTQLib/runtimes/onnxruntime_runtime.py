"""ONNX Runtime on the CPU: the reference executor of FP32 and Q/DQ ONNX files.

It runs a Q/DQ graph exactly as the ONNX standard defines it, which makes
it the yardstick for the other backends' INT8 output; on a CPU without
VNNI its int8 MatMul would sum weight pairs in int16 and saturate, so
there those weights are fitted as for OpenVINO (:mod:`..int8_compat`,
reported as :attr:`OnnxRuntimeRuntime.int8_adaptation`). It is not the fast
INT8 path for 3D networks: its 3D QLinearConv is no faster than its float
Conv on this hardware (see docs/cpu-int8.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import PTQError
from .base import Runtime

PRECISIONS = ("fp32", "int8")
QUANTIZATION_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger",
                              "MatMulInteger", "QLinearMatMul"})


def is_quantized_onnx(model_path: Path) -> bool:
    """True when the ONNX graph (or one of its functions) holds quantization nodes."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise PTQError(f"{model_path} is not a readable ONNX file ({exc}). "
                       "Export the network again (slicer-ptq export).") from exc
    graphs = [model.graph] + [function for function in model.functions]
    return any(node.op_type in QUANTIZATION_OPS for graph in graphs for node in graph.node)


class OnnxRuntimeRuntime(Runtime):
    """An ONNX file in an ``onnxruntime.InferenceSession`` on the CPU provider."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, precision: Optional[str] = None,
                 threads: Optional[int] = None, adapt_int8: bool = True):
        """``adapt_int8`` False: run a Q/DQ file as it is (one already adapted by
        :func:`..int8_compat.as_run_here` fits every int16 pair)."""
        import onnxruntime

        from . import resolve_precision

        model_path = Path(model_path)
        if model_path.suffix.lower() != ".onnx":
            raise PTQError(f"Backend 'onnxruntime' runs ONNX files (.onnx), not {model_path.name}. "
                           "Export the network to ONNX first, or use backend 'torch' for TorchScript.")
        self.model_path = model_path
        self.precision = resolve_precision(precision, is_quantized_onnx(model_path), PRECISIONS,
                                           self.name, model_path)
        self.threads = threads
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default (all cores)
        options.inter_op_num_threads = 1  # one patch at a time: no parallel branches worth a pool
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.int8_adaptation = "" if adapt_int8 else "none: turned off"
        source = self._source(model_path) if self.precision == "int8" and adapt_int8 else str(model_path)
        try:
            self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NotImplemented types
            raise PTQError(f"ONNX Runtime cannot load {model_path}: {exc}. "
                           "Check that the file is complete and exported with opset >= 13.") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise PTQError(f"{model_path} has {len(inputs)} inputs ({[i.name for i in inputs]}); "
                           "segmentation networks here take one image input. Export it with one input.")
        self.input_name = inputs[0].name

    def _source(self, model_path: Path):
        """The file, or the bytes of its graph with MatMul weight pairs that fit int16 here."""
        from ..cpu_info import isa_flags
        from ..int8_compat import ONNXRUNTIME_PAIR_SUMMING_OPS, adapted_model, int8_path
        from ..onnx_graph import load_model

        path = int8_path(isa_flags(), environ={})   # MLAS picks its kernels by CPUID, not by oneDNN's cap
        if not path.pair_safe_weights:
            self.int8_adaptation = f"none: {path.reason}"
            return str(model_path)
        model, changes = adapted_model(load_model(model_path), shift_activations=False, pair_safe_weights=True,
                                       weight_readers=ONNXRUNTIME_PAIR_SUMMING_OPS)
        if not changes["weights_requantized"]:
            self.int8_adaptation = "none: no MatMul weight pairs past int16"
            return str(model_path)
        self.int8_adaptation = (f"{changes['weights_requantized']} MatMul weights rescaled against int16 pair "
                                f"overflow ({path.reason})")
        return model.SerializeToString()

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``(B, C_in, D, H, W)`` float32 -> ``(B, C_out, D, H, W)`` float32."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return self.session.run(None, {self.input_name: batch})[0]

    def close(self) -> None:
        self.session = None
