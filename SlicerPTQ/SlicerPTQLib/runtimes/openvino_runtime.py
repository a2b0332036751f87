"""OpenVINO on the CPU: FP32, BF16, and real INT8 kernels from Q/DQ ONNX files.

OpenVINO reads a Q/DQ ONNX file directly and runs the quantized
convolutions with integer kernels (AMX or VNNI where the CPU has them).
Its default CPU precision on AMX machines is BF16, so "fp32" sets the
precision hint to f32 explicitly; every compiled model's hint is read back
so :attr:`precision` says what really ran. On CPUs without int8 dot
products (no VNNI/AMX) a Q/DQ ONNX file is adapted as it is read
(:mod:`..int8_compat`); :attr:`int8_adaptation` says what was done.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import PTQError
from .base import Runtime

SUFFIXES = (".onnx", ".xml")
PRECISIONS = ("fp32", "bf16", "int8")
# The float hint per precision. INT8 keeps the non-quantized layers in f32:
# measured on deepbet (QDQ, AMX) a bf16 remainder was no faster, and f32
# keeps those layers as exact as the reference executor.
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
_PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "i8": "int8", "u8": "uint8",
                    "i32": "int32", "i64": "int64", "boolean": "bool"}
# Graph bookkeeping in the runtime model, not computation.
_NOT_EXECUTED = frozenset({"Const", "Input", "Output"})
_MAX_CACHED_SHAPES = 4


def _quantized(model) -> bool:
    """True when an ``ov.Model`` read from ONNX holds Q/DQ (FakeQuantize or int weights)."""
    import openvino as ov

    integer_types = {ov.Type.i8, ov.Type.u8, ov.Type.i4, ov.Type.u4}
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind == "Constant" and op.get_output_element_type(0) in integer_types:
            return True
    return False


class OpenVINORuntime(Runtime):
    """An ONNX (or OpenVINO IR) file compiled for OpenVINO's CPU plugin.

    Models with dynamic spatial dims are reshaped to each patch shape seen
    and compiled once per shape (a sliding window uses one shape): static
    shapes ran 3-10% faster than one dynamic compile on deepbet and skip
    the dynamic first-call cost.
    """

    name = "openvino"

    def __init__(self, model_path: Path, precision: Optional[str] = None,
                 threads: Optional[int] = None, adapt_int8: Optional[bool] = None):
        """``adapt_int8``: rewrite a Q/DQ ONNX file for CPUs without int8 dot
        products; ``None`` decides from this CPU (:func:`..int8_compat.int8_path`)."""
        import openvino as ov

        from . import resolve_precision

        model_path = Path(model_path)
        if model_path.suffix.lower() not in SUFFIXES:
            raise PTQError(f"Backend 'openvino' runs ONNX (.onnx) or OpenVINO IR (.xml) files, not "
                           f"{model_path.name}. Export the network to ONNX first.")
        self.model_path = model_path
        self.threads = threads
        self._core = ov.Core()
        self.int8_adaptation = ""
        try:
            self._model = self._read_model(model_path, adapt_int8)
        except RuntimeError as exc:
            raise PTQError(f"OpenVINO cannot read {model_path}: {str(exc).splitlines()[0]}. "
                           "Check that the file is a complete ONNX export.") from exc
        if len(self._model.inputs) != 1:
            raise PTQError(f"{model_path} has {len(self._model.inputs)} inputs; segmentation networks "
                           "here take one image input. Export it with one input.")
        self.precision = resolve_precision(precision, _quantized(self._model), PRECISIONS,
                                           self.name, model_path)
        self._config = {"INFERENCE_PRECISION_HINT": _HINTS[self.precision],
                        "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            self._config["INFERENCE_NUM_THREADS"] = threads
        self._compiled: "OrderedDict[Tuple[int, ...], Tuple[object, object]]" = OrderedDict()
        self._last_compiled = None
        if self._model.inputs[0].get_partial_shape().is_static:
            self._compile(tuple(self._model.inputs[0].get_shape()))

    def _read_model(self, model_path: Path, adapt_int8: Optional[bool]):
        """Read the file, adapted for this CPU's int8 path when it is a Q/DQ ONNX model."""
        from ..int8_compat import adapted_model, path_here
        from ..onnx_graph import load_model

        path = path_here(adapt_int8)
        if model_path.suffix.lower() != ".onnx" or not path.needs_adaptation:
            self.int8_adaptation = f"none: {path.reason}"
            return self._core.read_model(str(model_path))
        model, changes = adapted_model(load_model(model_path), path.shift_activations, path.pair_safe_weights,
                                       float_deconvolution_inputs=path.float_deconvolution_inputs)
        if not any(changes.values()):
            self.int8_adaptation = "none: no int8 Q/DQ pairs or wide weights"
            return self._core.read_model(str(model_path))
        self.int8_adaptation = (f"{changes['activation_pairs']} activation Q/DQ pairs as uint8 with zero "
                                f"point 128, {changes['weights_requantized']} weights rescaled against int16 "
                                f"pair overflow, {changes['float_deconvolution_inputs']} transposed convolutions "
                                f"reading float ({path.reason})")
        return self._core.read_model(model.SerializeToString(), b"")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``(B, C_in, D, H, W)`` float32 -> ``(B, C_out, D, H, W)`` float32."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        request = self._request(batch.shape)
        # share_inputs avoids copying the patch; outputs are copied out of
        # OpenVINO's buffer, which the next call overwrites.
        return request.infer({0: batch}, share_inputs=True)[0]

    def inference_precision(self) -> str:
        """The precision hint the last compiled model really uses ("fp32", "bf16")."""
        compiled = self._last_compiled or self._compile_dynamic()
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        return _PRECISION_NAMES.get(hint.get_type_name(), hint.get_type_name())

    def layer_precisions(self) -> List[Dict[str, str]]:
        """Executed layers of the last compiled model, in execution order.

        Each: ``{"name", "type" (OpenVINO layerType, e.g. "Convolution"),
        "precision" ("fp32", "bf16", "int8", ...), "implementation"
        (oneDNN primitive, e.g. "brgconv_avx512_amx_i8")}``.
        """
        compiled = self._last_compiled or self._compile_dynamic()
        layers = []
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            layer_type = info["layerType"].astype(str)
            if layer_type in _NOT_EXECUTED:
                continue
            precision = info["runtimePrecision"].astype(str)
            layers.append({
                "name": op.get_friendly_name(),
                "type": layer_type,
                "precision": _PRECISION_NAMES.get(precision, precision),
                "implementation": info["primitiveType"].astype(str),
            })
        return layers

    def close(self) -> None:
        self._compiled.clear()
        self._last_compiled = None

    def _request(self, shape: Tuple[int, ...]):
        shape = tuple(int(size) for size in shape)
        if shape in self._compiled:
            self._compiled.move_to_end(shape)
            compiled, request = self._compiled[shape]
            self._last_compiled = compiled
            return request
        return self._compile(shape)

    def _compile(self, shape: Tuple[int, ...]):
        """Compile the model for one input shape and cache its infer request."""
        model = self._model
        expected = model.inputs[0].get_partial_shape()
        channels = expected[1] if expected.rank.get_length() == 5 else None
        if len(shape) != 5 or channels is None or (channels.is_static and channels.get_length() != shape[1]):
            raise PTQError(f"{self.model_path} takes input {expected}, got a batch of shape {list(shape)}. "
                           "Give patches (B, C, D, H, W) with the model's channel count.")
        if not expected.is_static or tuple(model.inputs[0].get_shape()) != shape:
            model = model.clone()
            try:
                model.reshape({model.inputs[0]: list(shape)})
            except RuntimeError as exc:
                raise PTQError(f"{self.model_path} cannot take input shape {list(shape)} (it takes "
                               f"{expected}): {str(exc).splitlines()[0]}. Use a patch size the model "
                               "was exported for.") from exc
        compiled = self._compile_model(model)
        request = compiled.create_infer_request()
        self._compiled[shape] = (compiled, request)
        if len(self._compiled) > _MAX_CACHED_SHAPES:
            self._compiled.popitem(last=False)
        self._last_compiled = compiled
        return request

    def _compile_dynamic(self):
        """Compile the model as read (shapes left dynamic), e.g. to inspect layers before a predict."""
        self._last_compiled = self._compile_model(self._model)
        return self._last_compiled

    def _compile_model(self, model):
        try:
            compiled = self._core.compile_model(model, "CPU", self._config)
        except RuntimeError as exc:
            raise PTQError(f"OpenVINO cannot compile {self.model_path} for the CPU: "
                           f"{str(exc).splitlines()[0]}. Check the model's operators and opset.") from exc
        if self.precision == "bf16":
            # OpenVINO silently falls back to f32 on CPUs without BF16 support.
            hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
            self.precision = _PRECISION_NAMES.get(hint, hint)
        return compiled


def int8_summary(layer_precisions: List[Dict[str, str]]) -> Dict[str, object]:
    """Count what ran in 8-bit integers, from any runtime's ``layer_precisions()``.

    Conv-like layers are those whose type names a convolution, deconvolution,
    matmul, gemm or fully connected layer (OpenVINO's and TensorRT's names
    both match). Returns ``{"conv_total", "conv_int8", "conv_implementations":
    {implementation: count}, "other_total", "other_int8",
    "other_precisions": {precision: count}}``.
    """
    summary = {"conv_total": 0, "conv_int8": 0, "conv_implementations": {},
               "other_total": 0, "other_int8": 0, "other_precisions": {}}
    for layer in layer_precisions:
        is_int8 = layer.get("precision", "").lower() in ("int8", "uint8", "i8", "u8")
        layer_type = layer.get("type", "").lower()
        if any(word in layer_type for word in ("conv", "matmul", "gemm", "fullyconnected")):
            summary["conv_total"] += 1
            summary["conv_int8"] += is_int8
            implementation = layer.get("implementation", "")
            counts = summary["conv_implementations"]
            counts[implementation] = counts.get(implementation, 0) + 1
        else:
            summary["other_total"] += 1
            summary["other_int8"] += is_int8
            counts = summary["other_precisions"]
            counts[layer.get("precision", "")] = counts.get(layer.get("precision", ""), 0) + 1
    return summary
