"""TensorRT on NVIDIA GPUs: INT8 engines from Q/DQ ONNX files, FP16 and FP32 from float ones.

The engine comes from :mod:`..tensorrt_build` (strongly typed, one
optimization profile for the sliding-window patches, cached per model,
settings, TensorRT version and GPU). Inference binds device buffers to the
engine's I/O (``set_input_shape`` + ``set_tensor_address``) and enqueues
``execute_async_v3`` on one stream; a batch larger than the profile's
maximum is run in chunks. Device memory and the stream come from
:mod:`.cuda_memory`: torch CUDA tensors when torch has CUDA, else
cuda-python (a CPU-only torch, as in many Slicer installs, must not hide
the GPU).

This module imports without TensorRT, CUDA or a GPU: ``tensorrt``, torch
and cuda-python are touched only inside functions, and
:func:`tensorrt_available` says in one sentence what is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import PTQError
from . import cuda_memory
from .base import Runtime

PRECISIONS = ("int8", "fp16", "fp32")
ENGINE_SUFFIXES = (".engine", ".plan")

_RUNTIME_CHECK: Dict[str, str] = {}  # TensorRT version -> why a Runtime cannot be created ("" = it can)


def install_hint() -> str:
    """The pip command for TensorRT matching this machine's CUDA (see dependencies.tensorrt_requirement)."""
    from ..dependencies import tensorrt_requirement

    return f"pip install {tensorrt_requirement().pip}"


def tensorrt_available() -> Tuple[bool, str]:
    """``(True, "TensorRT x on <GPU>")`` when engines can run here, else ``(False, why not)``.

    Really creates a ``trt.Runtime`` once per process (the cheapest call
    that needs libnvinfer and a working CUDA driver), so a broken install
    is reported here and not halfway through a segmentation.
    """
    reasons = []
    device_ok, device_how = cuda_memory.device_status()
    if not device_ok:
        reasons.append(device_how)
    trt = None
    if importlib.util.find_spec("tensorrt") is None:
        reasons.append(f"TensorRT is not installed ({install_hint()})")
    else:
        try:
            import tensorrt as trt
        except (ImportError, OSError) as exc:
            reasons.append(f"TensorRT is installed but cannot be loaded ({exc})")
    if trt is not None and device_ok:
        problem = _runtime_problem(trt)
        if problem:
            reasons.append(problem)
    if reasons:
        return False, "; ".join(reasons)
    try:
        gpu, _ = cuda_memory.open_device(0).identity()
    except PTQError as exc:
        return False, str(exc).rstrip(".")
    return True, f"TensorRT {trt.__version__} on {gpu} (device memory: {device_how})"


def _runtime_problem(trt) -> str:
    """Why ``trt.Runtime`` cannot be created here ("" when it can); tried once per process."""
    from ..tensorrt_build import create_runtime, trt_logger

    version = str(trt.__version__)
    if version not in _RUNTIME_CHECK:
        try:
            create_runtime(trt_logger())
            _RUNTIME_CHECK[version] = ""
        except PTQError as exc:
            _RUNTIME_CHECK[version] = str(exc).rstrip(".")
    return _RUNTIME_CHECK[version]


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
    ``max_batch`` patches go through one engine call. ``float_parts`` is
    the type of the layers an INT8 engine leaves unquantized: "fp16"
    (default, as NVIDIA's Model-Optimizer writes INT8 models) or "fp32".
    Engines are cached in
    ``cache_dir`` (default ``~/.cache/slicer-ptq/tensorrt``); :attr:`built`
    tells whether this call built the engine or found it cached.
    :attr:`memory` holds the device buffers and the stream (torch or
    cuda-python, :mod:`.cuda_memory`).

    Example::

        runtime = TensorRTRuntime("out/model.int8.onnx", roi=(128, 128, 128), max_batch=2)
        probabilities = runtime.predict(patches)  # (B, 1, 128, 128, 128) -> (B, 2, 128, 128, 128)
    """

    name = "tensorrt"

    def __init__(self, model_path_or_engine, precision: Optional[str] = None,
                 roi: Optional[Sequence[int]] = None, max_batch: int = 2, cache_dir: Optional[Path] = None,
                 optimization_level: int = 3, workspace_mib: int = 4096, device: int = 0,
                 float_parts: str = "fp16") -> None:
        require_tensorrt()
        import tensorrt as trt

        from ..tensorrt_build import create_runtime, tensorrt_failure, trt_logger

        path = Path(model_path_or_engine)
        if not path.is_file():
            raise PTQError(f"Model file not found: {path}. Give a .onnx file or a built .engine file.")
        self.memory = cuda_memory.open_device(device)
        # TensorRT builds and loads on the calling thread's current CUDA device.
        with self.memory.current():
            if path.suffix.lower() in ENGINE_SUFFIXES:
                engine_bytes, self.metadata = _engine_file(path, device)
                self.engine_path = path
                self.built = False
                self.precision = self.metadata.get("precision", "")
                if precision is not None and precision != self.precision:
                    raise PTQError(f"{path} is a {self.precision or 'unknown-precision'} engine, not {precision}; "
                                   f"give the ONNX model to build a {precision} engine.")
            else:
                settings = dict(max_batch=int(max_batch), optimization_level=optimization_level,
                                workspace_mib=workspace_mib, float_parts=float_parts)
                cached = _engine_from_onnx(path, precision, roi, cache_dir, device, settings)
                engine_bytes, self.metadata = cached.read_bytes(), cached.metadata
                self.engine_path = cached.engine_path
                self.built = cached.built
                self.precision = self.metadata["precision"]
            logger = trt_logger()
            logger.errors = []
            self._runtime = create_runtime(logger)
            rebuild = "Delete it and give the ONNX model to rebuild it."
            self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise tensorrt_failure(f"could not load the engine {self.engine_path}", rebuild)
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise tensorrt_failure(f"could not create an execution context for {self.engine_path} (out of "
                                       "GPU memory?)", "Close other GPU programs or lower max_batch.")
        self._bind_io(trt)

    def _bind_io(self, trt) -> None:
        names = [self.engine.get_tensor_name(index) for index in range(self.engine.num_io_tensors)]
        inputs = [name for name in names if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        self._outputs = [name for name in names if self.engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not self._outputs:
            raise PTQError(f"The engine {self.engine_path} has {len(inputs)} inputs and {len(self._outputs)} "
                           "outputs; the sliding-window runtime needs one image input.")
        self._input = inputs[0]
        self._dtypes = {name: _numpy_dtype(trt, self.engine.get_tensor_dtype(name)) for name in names}
        low, _, high = (tuple(shape) for shape in self.engine.get_tensor_profile_shape(self._input, 0))
        self.max_batch = int(high[0])
        self.channels = int(high[1])
        self.spatial_range = (tuple(int(v) for v in low[2:]), tuple(int(v) for v in high[2:]))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Forward float32 ``(B, C, D, H, W)`` patches; returns the float32 ``(B, K, D, H, W)`` output."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        self._check_batch(batch.shape)
        results = []
        with self.memory.current():
            for start in range(0, batch.shape[0], self.max_batch):
                chunk = batch[start:start + self.max_batch].astype(self._dtypes[self._input], copy=False)
                output = self.run_device(self.memory.upload(chunk))
                results.append(self.memory.download(output).astype(np.float32, copy=False))
        return results[0] if len(results) == 1 else np.concatenate(results, axis=0)

    def run_device(self, inputs: Any) -> Any:
        """Enqueue one engine call on the device stream for a device buffer (b <= max_batch, C, D, H, W).

        ``inputs`` is a buffer of :attr:`memory` (a CUDA tensor with torch)
        in the engine's input type. Returns the first output's buffer; the
        work is asynchronous, so read it with ``memory.download`` (which
        waits) or synchronize first.
        """
        shape = tuple(int(v) for v in inputs.shape)
        if not self.context.set_input_shape(self._input, shape):
            raise PTQError(f"The engine rejects input shape {shape}; it was built for batch "
                           f"1..{self.max_batch} and patches {self.spatial_range[0]}..{self.spatial_range[1]}.")
        self._bind(self._input, inputs)
        outputs = []
        for name in self._outputs:
            buffer = self.memory.empty(tuple(self.context.get_tensor_shape(name)), self._dtypes[name])
            self._bind(name, buffer)
            outputs.append(buffer)
        # Keep every buffer alive until the stream is done with it (the next call replaces them).
        self._in_flight = [inputs] + outputs
        if not self.context.execute_async_v3(self.memory.stream_handle):
            from ..tensorrt_build import tensorrt_failure

            raise tensorrt_failure("failed to run the engine", "Rebuild it from the ONNX model or lower max_batch.")
        return outputs[0]

    def _bind(self, name: str, buffer: Any) -> None:
        if not self.context.set_tensor_address(name, self.memory.address(buffer)):
            from ..tensorrt_build import tensorrt_failure

            raise tensorrt_failure(f"refused the device address of tensor '{name}'",
                                   "Rebuild the engine from the ONNX model.")

    def _check_batch(self, shape: Tuple[int, ...]) -> None:
        low, high = self.spatial_range
        if len(shape) != 5 or shape[1] != self.channels:
            raise PTQError(f"TensorRT takes patches (B, {self.channels}, D, H, W), got shape {shape}.")
        if not all(lo <= size <= hi for lo, size, hi in zip(low, shape[2:], high)):
            raise PTQError(f"Patch size {shape[2:]} is outside the engine's profile {low}..{high}; build the "
                           "engine with the roi the sliding window uses (roi=...).")

    def layer_information(self) -> str:
        """The engine inspector's JSON (``LayerInformationFormat.JSON``) of the whole engine."""
        import tensorrt as trt

        inspector = self.engine.create_engine_inspector()
        return inspector.get_engine_information(trt.LayerInformationFormat.JSON)

    def layer_precisions(self) -> List[Dict[str, str]]:
        """Per engine layer ``{"name", "type", "precision"}`` from TensorRT's engine inspector.

        ConvTranspose layers carry ``"convtranspose": "yes"`` and a
        ``"note"`` when they did not run INT8.
        """
        from ..tensorrt_build import parse_layer_information

        return parse_layer_information(self.layer_information(), self.metadata.get("onnx_ops", {}))

    def close(self) -> None:
        """Release the execution context and the engine's device memory."""
        self._in_flight = []
        self.context = None
        self.engine = None
        self._runtime = None


def _engine_from_onnx(path: Path, precision: Optional[str], roi: Optional[Sequence[int]],
                      cache_dir: Optional[Path], device: int, settings: Dict[str, Any]):
    from ..tensorrt_build import BuildSettings, engine_for, has_qdq
    from . import resolve_precision

    if path.suffix.lower() != ".onnx":
        raise PTQError(f"TensorRT takes an ONNX model or a built .engine file, not {path.name}. Export the "
                       "network to ONNX first (slicer-ptq quantize writes model.fp32.onnx and model.int8.onnx).")
    precision = resolve_precision(precision, has_qdq(path), PRECISIONS, "tensorrt", path)
    build = BuildSettings(precision=precision, roi=_roi_for(path, roi), **settings)
    return engine_for(path, build, cache_dir=cache_dir, device=device)


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


def _numpy_dtype(trt, trt_type) -> np.dtype:
    table = {trt.float32: np.float32, trt.float16: np.float16, trt.int8: np.int8, trt.int32: np.int32,
             trt.int64: np.int64, trt.bool: np.bool_}
    if trt_type not in table:
        raise PTQError(f"The engine uses I/O type {trt_type}, which the runtime cannot bind; export the "
                       "network with float32 input and output.")
    return np.dtype(table[trt_type])
