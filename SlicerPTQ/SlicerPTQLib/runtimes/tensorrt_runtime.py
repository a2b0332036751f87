"""TensorRT on NVIDIA GPUs: INT8 engines from Q/DQ ONNX files, FP16 and FP32 from float ones.

The engine comes from :mod:`..tensorrt_build` (strongly typed, one
optimization profile for the sliding-window patches, cached per model,
settings, TensorRT version and GPU). Inference binds torch CUDA tensors to
the engine's I/O (``set_input_shape`` + ``set_tensor_address``) and enqueues
``execute_async_v3`` on a torch CUDA stream; a batch larger than the
profile's maximum is run in chunks.

This module imports without TensorRT, CUDA or a GPU: ``tensorrt`` and
``torch.cuda`` are touched only inside functions, and
:func:`tensorrt_available` says in one sentence what is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    import torch

from ..errors import PTQError
from .base import Runtime

PRECISIONS = ("int8", "fp16", "fp32")
ENGINE_SUFFIXES = (".engine", ".plan")
INSTALL_HINT = "pip install tensorrt-cu12"


def tensorrt_available() -> Tuple[bool, str]:
    """``(True, "TensorRT x on <GPU>")`` when engines can run here, else ``(False, why not)``."""
    reasons = []
    try:
        import torch
    except ImportError:
        torch = None
        reasons.append("PyTorch is not installed (install a CUDA build of torch)")
    if torch is not None and not torch.cuda.is_available():
        reasons.append("no CUDA GPU found (torch.cuda.is_available() is False)")
    trt = None
    if importlib.util.find_spec("tensorrt") is None:
        reasons.append(f"TensorRT is not installed ({INSTALL_HINT})")
    else:
        try:
            import tensorrt as trt
        except (ImportError, OSError) as exc:
            reasons.append(f"TensorRT is installed but cannot be loaded ({exc})")
    if reasons:
        return False, "; ".join(reasons)
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(0)}"


def require_tensorrt() -> None:
    """PTQError in one sentence when TensorRT cannot run here."""
    usable, reason = tensorrt_available()
    if not usable:
        raise PTQError(f"The TensorRT backend cannot run here: {reason}; use backend 'openvino' for INT8 "
                       "on the CPU, or a machine with an NVIDIA GPU, CUDA and TensorRT.")


class TensorRTRuntime(Runtime):
    """A TensorRT engine behind the ``predict`` face.

    ``model_path_or_engine`` is a QDQ ONNX file (``precision="int8"``), a
    float ONNX file (``"fp16"`` or ``"fp32"``), or an ``.engine`` file with
    its ``.engine.json`` sidecar. ``precision=None`` picks "int8" for a Q/DQ
    file and "fp32" otherwise. ``roi`` (D, H, W) is the patch the engine is
    optimized for (default: the model's ``roi_size`` from its JSON sidecar);
    ``max_batch`` patches go through one engine call. Engines are cached in
    ``cache_dir`` (default ``~/.cache/slicer-ptq/tensorrt``); :attr:`built`
    tells whether this call built the engine or found it cached.

    Example::

        runtime = TensorRTRuntime("out/model.int8.onnx", roi=(128, 128, 128), max_batch=2)
        probabilities = runtime.predict(patches)  # (B, 1, 128, 128, 128) -> (B, 2, 128, 128, 128)
    """

    name = "tensorrt"

    def __init__(self, model_path_or_engine, precision: Optional[str] = None,
                 roi: Optional[Sequence[int]] = None, max_batch: int = 2, cache_dir: Optional[Path] = None,
                 optimization_level: int = 3, workspace_mib: int = 4096, device: int = 0) -> None:
        require_tensorrt()
        import tensorrt as trt
        import torch

        from ..tensorrt_build import trt_logger

        path = Path(model_path_or_engine)
        if not path.is_file():
            raise PTQError(f"Model file not found: {path}. Give a .onnx file or a built .engine file.")
        self.device = torch.device("cuda", device)
        # TensorRT builds and loads on the calling thread's current CUDA device.
        with torch.cuda.device(self.device):
            if path.suffix.lower() in ENGINE_SUFFIXES:
                engine_bytes, self.metadata = _engine_file(path, device)
                self.engine_path = path
                self.built = False
                self.precision = self.metadata.get("precision", "")
                if precision is not None and precision != self.precision:
                    raise PTQError(f"{path} is a {self.precision or 'unknown-precision'} engine, not {precision}; "
                                   f"give the ONNX model to build a {precision} engine.")
            else:
                cached = _engine_from_onnx(path, precision, roi, max_batch, cache_dir, optimization_level,
                                           workspace_mib, device)
                engine_bytes, self.metadata = cached.read_bytes(), cached.metadata
                self.engine_path = cached.engine_path
                self.built = cached.built
                self.precision = self.metadata["precision"]
            self._runtime = trt.Runtime(trt_logger())
            self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise PTQError(f"TensorRT {trt.__version__} could not load the engine {self.engine_path}; "
                               "delete it and give the ONNX model to rebuild it.")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(device=self.device)
        self._bind_io(trt, torch)

    def _bind_io(self, trt, torch) -> None:
        names = [self.engine.get_tensor_name(index) for index in range(self.engine.num_io_tensors)]
        inputs = [name for name in names if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        self._outputs = [name for name in names if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not self._outputs:
            raise PTQError(f"The engine {self.engine_path} has {len(inputs)} inputs and {len(self._outputs)} "
                           "outputs; the sliding-window runtime needs one image input.")
        self._input = inputs[0]
        self._dtypes = {name: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(name)) for name in names}
        low, _, high = (tuple(shape) for shape in self.engine.get_tensor_profile_shape(self._input, 0))
        self.max_batch = int(high[0])
        self.channels = int(high[1])
        self.spatial_range = (tuple(int(v) for v in low[2:]), tuple(int(v) for v in high[2:]))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Forward float32 ``(B, C, D, H, W)`` patches; returns the float32 ``(B, K, D, H, W)`` output."""
        import torch

        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self._check_batch(batch.shape)
        results = []
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream), torch.inference_mode():
            for start in range(0, batch.shape[0], self.max_batch):
                chunk = torch.from_numpy(batch[start:start + self.max_batch]).to(self.device)
                output = self.run_device(chunk)
                results.append(output.float().cpu().numpy())
        return results[0] if len(results) == 1 else np.concatenate(results, axis=0)

    def run_device(self, inputs) -> "torch.Tensor":
        """Enqueue one engine call on :attr:`stream` for a CUDA tensor (b <= max_batch, C, D, H, W).

        Returns the first output as a CUDA tensor; the work is asynchronous,
        so synchronize :attr:`stream` (or copy to the host) before reading it.
        """
        import torch

        if inputs.dtype != self._dtypes[self._input]:
            inputs = inputs.to(self._dtypes[self._input])
        inputs = inputs.contiguous()
        if not self.context.set_input_shape(self._input, tuple(inputs.shape)):
            raise PTQError(f"The engine rejects input shape {tuple(inputs.shape)}; it was built for batch "
                           f"1..{self.max_batch} and patches {self.spatial_range[0]}..{self.spatial_range[1]}.")
        self.context.set_tensor_address(self._input, inputs.data_ptr())
        outputs = []
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=self._dtypes[name], device=self.device)
            tensor.record_stream(self.stream)
            self.context.set_tensor_address(name, tensor.data_ptr())
            outputs.append(tensor)
        # The input may come from another stream: start only once it is written,
        # and keep every buffer alive until this stream is done with it.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        inputs.record_stream(self.stream)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise PTQError("TensorRT failed to run the engine (see the TensorRT log above); rebuild it from "
                           "the ONNX model or lower max_batch.")
        return outputs[0]

    def _check_batch(self, shape: Tuple[int, ...]) -> None:
        low, high = self.spatial_range
        if len(shape) != 5 or shape[1] != self.channels:
            raise PTQError(f"TensorRT takes patches (B, {self.channels}, D, H, W), got shape {shape}.")
        if not all(lo <= size <= hi for lo, size, hi in zip(low, shape[2:], high)):
            raise PTQError(f"Patch size {shape[2:]} is outside the engine's profile {low}..{high}; build the "
                           "engine with the roi the sliding window uses (roi=...).")

    def layer_precisions(self) -> List[Dict[str, str]]:
        """Per engine layer ``{"name", "type", "precision"}`` from TensorRT's engine inspector.

        ConvTranspose layers carry ``"convtranspose": "yes"`` and a
        ``"note"`` when they did not run INT8.
        """
        import tensorrt as trt

        from ..tensorrt_build import parse_layer_information

        inspector = self.engine.create_engine_inspector()
        text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        return parse_layer_information(text, self.metadata.get("convtranspose_nodes", []))

    def close(self) -> None:
        """Release the execution context and the engine's device memory."""
        self.context = None
        self.engine = None
        self._runtime = None


def _engine_from_onnx(path: Path, precision: Optional[str], roi: Optional[Sequence[int]], max_batch: int,
                      cache_dir: Optional[Path], optimization_level: int, workspace_mib: int, device: int):
    from ..tensorrt_build import BuildSettings, engine_for, has_qdq
    from . import resolve_precision

    if path.suffix.lower() != ".onnx":
        raise PTQError(f"TensorRT takes an ONNX model or a built .engine file, not {path.name}. Export the "
                       "network to ONNX first (slicer-ptq quantize writes model.fp32.onnx and model.int8.onnx).")
    precision = resolve_precision(precision, has_qdq(path), PRECISIONS, "tensorrt", path)
    settings = BuildSettings(precision=precision, roi=_roi_for(path, roi), max_batch=int(max_batch),
                             optimization_level=optimization_level, workspace_mib=workspace_mib)
    return engine_for(path, settings, cache_dir=cache_dir, device=device)


def _roi_for(path: Path, roi: Optional[Sequence[int]]) -> Tuple[int, int, int]:
    """The given roi, else the model's ``roi_size`` from its JSON sidecar, else the file's static dims."""
    from ..spec import ModelSpec, sidecar_path, spec_list
    from ..tensorrt_build import onnx_input

    if roi is not None:
        return tuple(spec_list(roi))
    if sidecar_path(path).is_file():
        return tuple(ModelSpec.load(sidecar_path(path)).roi_size)
    _, dims = onnx_input(path)
    if len(dims) == 5 and all(dim is not None for dim in dims[2:]):
        return tuple(dims[2:])
    raise PTQError(f"No patch size for {path}: pass roi=(D, H, W) or put the model's JSON (roi_size) "
                   "beside it.")


def _engine_file(path: Path, device: int) -> Tuple[bytes, Dict]:
    """Bytes and metadata of a standalone engine, refused when built elsewhere."""
    import tensorrt as trt

    from ..engine_cache import read_sidecar
    from ..tensorrt_build import gpu_identity

    record = read_sidecar(path)
    key = record.get("key", {})
    gpu_name, capability = gpu_identity(device)
    built_for = (key.get("tensorrt_version"), key.get("compute_capability"))
    if built_for != (trt.__version__, capability):
        raise PTQError(f"{path} was built with TensorRT {built_for[0]} for compute capability {built_for[1]}, "
                       f"this machine has TensorRT {trt.__version__} on {gpu_name} ({capability}); give the "
                       "ONNX model to build a matching engine.")
    return path.read_bytes(), record.get("metadata", {})


def _torch_dtype(trt, torch, trt_type):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
             trt.int32: torch.int32, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    if trt_type not in table:
        raise PTQError(f"The engine uses I/O type {trt_type}, which the runtime cannot bind; export the "
                       "network with float32 input and output.")
    return table[trt_type]
