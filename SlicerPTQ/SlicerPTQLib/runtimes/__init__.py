"""One ``predict(patch)`` face per inference backend.

``create_runtime(path, backend)`` picks the backend class; each backend's
module is imported only when asked for, so a missing optional package
(TensorRT, OpenVINO) costs nothing until it is needed.

Backends:
  - ``"torch"``: TorchScript files (PyTorch eager, FP32), the baseline;
  - ``"onnxruntime"``: reference executor of FP32 and Q/DQ ONNX files (CPU);
  - ``"openvino"``: the fast CPU path (FP32, BF16, real INT8 from Q/DQ files);
  - ``"tensorrt"``: NVIDIA GPUs (FP32, FP16, INT8 from Q/DQ files).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Dict, Optional

from ..errors import PTQError
from .base import Runtime
from .openvino_runtime import int8_summary  # backend-neutral; OpenVINO's module imports openvino lazily

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")

__all__ = ["BACKENDS", "Runtime", "available_backends", "create_runtime", "int8_summary",
           "resolve_precision"]


def create_runtime(model_path: Path, backend: str, precision: Optional[str] = None,
                   threads: Optional[int] = None, batch_size: int = 1) -> Runtime:
    """Load ``model_path`` into the runtime of ``backend``.

    ``precision`` is what the kernels should compute in ("fp32", "bf16",
    "fp16", "int8"; which ones a backend offers differs); ``None`` means
    "int8" for a Q/DQ ONNX file and "fp32" otherwise. ``threads`` caps the
    CPU threads (``None``: the backend's default, usually all cores).
    ``batch_size`` is how many sliding-window patches one ``predict`` gets;
    TensorRT builds its engine profile for it (CPU runtimes need no hint).
    """
    model_path = Path(model_path)
    if backend not in BACKENDS:
        raise PTQError(f"Unknown backend '{backend}'. Choose one of: {', '.join(BACKENDS)}.")
    if not model_path.exists():
        raise PTQError(f"Model file not found: {model_path}. Check the path.")
    if threads is not None and threads < 1:
        raise PTQError(f"threads must be a positive number, got {threads}. Leave it unset to use all cores.")
    if backend == "torch":
        from .torch_runtime import TorchRuntime
        return TorchRuntime(model_path, precision=precision, threads=threads)
    if backend == "onnxruntime":
        from .onnxruntime_runtime import OnnxRuntimeRuntime
        return OnnxRuntimeRuntime(model_path, precision=precision, threads=threads)
    if backend == "openvino":
        from .openvino_runtime import OpenVINORuntime
        return OpenVINORuntime(model_path, precision=precision, threads=threads)
    tensorrt_runtime = _tensorrt_module()
    usable, reason = tensorrt_runtime.tensorrt_available()
    if not usable:
        raise PTQError(f"TensorRT cannot run here: {reason}. Use backend 'openvino' on the CPU, "
                       "or run on a machine with an NVIDIA GPU, CUDA and the tensorrt package.")
    return tensorrt_runtime.TensorRTRuntime(model_path, precision=precision, max_batch=max(1, batch_size))


def available_backends() -> Dict[str, str]:
    """Backend name -> "" when it can run here, else why it cannot."""
    return {
        "torch": _import_reason("torch"),
        "onnxruntime": _onnxruntime_reason(),
        "openvino": _openvino_reason(),
        "tensorrt": _tensorrt_reason(),
    }


def resolve_precision(requested: Optional[str], quantized: bool, offered: tuple,
                      backend: str, model_path: Path) -> str:
    """The precision a runtime will run ``model_path`` in, or PTQError.

    A Q/DQ file runs its quantized layers in INT8 whatever is asked, so it
    only takes "int8"; a float file cannot give "int8" (quantize it first).
    """
    if requested is None:
        return "int8" if quantized else "fp32"
    if requested not in offered:
        raise PTQError(f"Backend '{backend}' cannot run precision '{requested}'. "
                       f"Choose one of: {', '.join(offered)}.")
    if quantized and requested != "int8":
        raise PTQError(f"{model_path} is a quantized (Q/DQ) model, so its layers run in INT8, not "
                       f"'{requested}'. Ask for precision 'int8', or give the FP32 model for '{requested}'.")
    if requested == "int8" and not quantized:
        raise PTQError(f"{model_path} has no quantization (Q/DQ) nodes, so it cannot run in INT8. "
                       "Quantize it first (slicer-ptq quantize), or ask for precision 'fp32'.")
    return requested


def _import_reason(module: str) -> str:
    try:
        __import__(module)
    except ImportError as exc:
        return f"the Python package '{module}' is not installed ({exc})"
    return ""


def _onnxruntime_reason() -> str:
    missing = _import_reason("onnxruntime")
    if missing:
        return missing
    import onnxruntime

    if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
        return "onnxruntime has no CPUExecutionProvider"
    return ""


def _openvino_reason() -> str:
    missing = _import_reason("openvino")
    if missing:
        return missing
    import openvino

    if "CPU" not in openvino.Core().available_devices:
        return "OpenVINO sees no CPU device"
    return ""


def _tensorrt_module():
    """The TensorRT backend module, or PTQError when it cannot be imported."""
    try:
        return importlib.import_module(".tensorrt_runtime", __name__)
    except ImportError as exc:
        raise PTQError(f"The TensorRT backend cannot be loaded ({exc}). Use backend 'openvino' on the CPU, "
                       "or install CUDA and the tensorrt package on a machine with an NVIDIA GPU.") from exc


def _tensorrt_reason() -> str:
    try:
        tensorrt_runtime = importlib.import_module(".tensorrt_runtime", __name__)
    except ImportError as exc:
        return f"the TensorRT backend cannot be loaded ({exc})"
    usable, reason = tensorrt_runtime.tensorrt_available()
    return "" if usable else reason
